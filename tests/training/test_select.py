"""pass@k selection and self-refine data with a scripted engine: n=k in one call, resumable records."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from server.prompts import REFINE_PROMPT, PromptFormat
from training.config import RefineConfig, SelectionConfig
from training.data import NO_CALL_ANSWER, GroundTruthCall
from training.refine_data import build_refine_examples, refine_counts, refine_examples
from training.resumable import read_records
from training.select import select

RIGHT, WRONG, CLOSE = "[get_weather(city='Paris')]", "[get_time(city='Paris')]", "[get_weather(city='Pari')]"


def test_selection_samples_k_answers_in_one_call_and_keeps_approximate_hits(
    scripted, make_sample, tmp_path: Path
) -> None:  # noqa: ANN001
    answers = {
        "Paris": [WRONG, CLOSE, WRONG],  # CLOSE has one differing value: ≈ the truth
        "Rome": [WRONG, WRONG, RIGHT],  # RIGHT asks for Paris: one value off too, but the name is wrong in the others
        "Oslo": [WRONG, WRONG, WRONG],
    }
    engine = scripted(lambda messages, params: answers[messages[-1]["content"].split()[-1].rstrip("?")])
    samples = [make_sample("a", "Paris"), make_sample("b", "Oslo")]
    config = SelectionConfig(k=3, concurrency=2)
    records = asyncio.run(select(engine, samples, config, tmp_path / "select.jsonl", adapter="it1", iteration=1))
    assert [r["selected"] for r in records.values()] == [True, False]
    assert records["a"]["matched"] == [False, True, False]
    assert len(engine.calls) == 2 and all(p.n == 3 and p.temperature == 1.0 for _, p, _ in engine.calls)
    assert all(adapter == "it1" for _, _, adapter in engine.calls)
    exact = asyncio.run(select(engine, samples, SelectionConfig(k=3, max_differing_values=0), tmp_path / "exact.jsonl"))
    assert not exact["a"]["selected"]


def test_selection_resumes_from_its_records(scripted, make_sample, tmp_path: Path) -> None:  # noqa: ANN001
    engine = scripted(lambda messages, params: [RIGHT] * params.n)
    samples = [make_sample(f"s{i}") for i in range(4)]
    path = tmp_path / "select.jsonl"
    asyncio.run(select(engine, samples[:2], SelectionConfig(k=2), path))
    with path.open("a") as f:
        f.write('{"id": "s2", "answers": [')  # a line cut short by a crash
    engine.calls.clear()
    records = asyncio.run(select(engine, samples, SelectionConfig(k=2), path))
    assert len(engine.calls) == 2  # only s2 and s3 were sampled again
    assert list(records) == ["s0", "s1", "s2", "s3"] and all(r["selected"] for r in records.values())


def test_refine_examples_keep_right_answers_and_try_every_distinct_wrong_one(
    scripted, make_sample, tmp_path: Path
) -> None:  # noqa: ANN001
    samples = [make_sample("stop"), make_sample("fix"), make_sample("wrong-only")]
    selection = {
        "stop": {"answers": [RIGHT, RIGHT]},  # right every time: a "keep your answer" example, nothing to fix
        "fix": {"answers": [WRONG, CLOSE, RIGHT, CLOSE]},  # keep RIGHT; WRONG is rejected, CLOSE (once) is fixed
        "wrong-only": {"answers": [CLOSE, WRONG]},  # nothing right to keep; CLOSE is fixed, WRONG rejected
    }

    def script(messages, params):  # noqa: ANN001, ANN202
        assert messages[-1] == {"role": "user", "content": REFINE_PROMPT}
        previous = messages[-2]["content"]
        return [RIGHT if previous == CLOSE else WRONG] * params.n

    engine = scripted(script)
    path = tmp_path / "refine.jsonl"
    examples = asyncio.run(
        build_refine_examples(engine, samples, selection, RefineConfig(k=4), SelectionConfig(), path)
    )
    by_id = {e.id: e for e in examples}
    assert set(by_id) == {"stop#keep", "fix#keep", "fix#fix1", "wrong-only#fix0"}
    assert by_id["stop#keep"].kind == "refine_stop" and by_id["stop#keep"].target == RIGHT
    assert by_id["stop#keep"].messages[-2]["content"] == RIGHT
    for fixed in ("fix#fix1", "wrong-only#fix0"):
        assert by_id[fixed].kind == "refine_fix" and by_id[fixed].target == RIGHT
        assert by_id[fixed].messages[-2]["content"] == CLOSE  # the model's own wrong answer is A1
    assert [e.messages[-1]["content"] for e in examples] == [REFINE_PROMPT] * 4
    # one n=k check per distinct wrong answer (CLOSE twice in "fix" is checked once); none for "stop"
    assert len(engine.calls) == 4 and all(p.n == 4 for _, p, _ in engine.calls)
    assert refine_counts(read_records(path)) == {"refine_stop": 2, "refine_fix": 2, "refine_fix_rejected": 2}
    # max_fixes=1: only the first distinct wrong answer of each sample is a candidate ("fix" loses its CLOSE)
    engine.calls.clear()
    capped = asyncio.run(
        build_refine_examples(
            engine, samples, selection, RefineConfig(k=4, max_fixes=1), SelectionConfig(), tmp_path / "capped.jsonl"
        )
    )
    assert {e.id for e in capped} == {"stop#keep", "fix#keep", "wrong-only#fix0"}
    assert sorted(messages[-2]["content"] for messages, _, _ in engine.calls) == sorted([WRONG, CLOSE])


def test_greedy_first_answers_are_what_refine_data_starts_from(scripted, make_sample, tmp_path: Path) -> None:  # noqa: ANN001
    """`first_answer: greedy`: the greedy answer (inference's A0) comes before the sampled ones, as the keep example
    where it is right and as the first fix candidate where it is wrong; every refinement here reaches the truth."""
    sample = make_sample("s")
    selection = {"s": {"answers": [CLOSE, RIGHT]}}

    def record(greedy: str, config: RefineConfig) -> tuple[dict[str, Any], list[Any]]:
        engine = scripted(lambda messages, params: [greedy] if params.greedy else [RIGHT] * params.n)
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        asyncio.run(build_refine_examples(engine, [sample], selection, config, SelectionConfig(), path))
        return read_records(path)["s"], engine.calls

    greedy = RefineConfig(k=2, max_fixes=1, first_answer="greedy")
    wrong, calls = record(WRONG, greedy)
    assert calls[0][1].greedy and calls[0][1].n == 1 and calls[0][0][-1]["content"] != REFINE_PROMPT
    assert wrong["greedy"] == WRONG and [f["first"] for f in wrong["fixes"]] == [WRONG] and wrong["stop"] == RIGHT
    right_as_greedy = RIGHT.replace("'", '"')  # right too, written otherwise than the sampled RIGHT
    right, _ = record(right_as_greedy, greedy)
    assert right["stop"] == right_as_greedy and [f["first"] for f in right["fixes"]] == [CLOSE]
    # sampled (the default): no greedy request; the first sampled wrong answer is the candidate
    sampled, calls = record(WRONG, RefineConfig(k=2, max_fixes=1))
    assert "greedy" not in sampled and [f["first"] for f in sampled["fixes"]] == [CLOSE]
    assert not any(params.greedy for _, params, _ in calls)


def test_a_near_miss_is_fixed_only_by_an_exactly_right_refinement(scripted, make_sample, tmp_path: Path) -> None:  # noqa: ANN001
    """CLOSE is one value off, so it ≈ the truth itself: refinements that only repeat it pass the paper's ≈ check
    without fixing anything, and the example would teach changing a value for no reason."""
    samples = [make_sample("echo"), make_sample("wrong")]
    selection = {"echo": {"answers": [CLOSE]}, "wrong": {"answers": [WRONG]}}
    engine = scripted(lambda messages, params: [CLOSE] * params.n)  # every refinement writes CLOSE
    path = tmp_path / "refine.jsonl"
    examples = asyncio.run(
        build_refine_examples(engine, samples, selection, RefineConfig(k=2), SelectionConfig(), path)
    )
    # WRONG -> CLOSE is a real step to within one value (kept, as Eq. 3 says); CLOSE -> CLOSE is not
    assert [e.id for e in examples] == ["wrong#fix0"]
    assert refine_counts(read_records(path)) == {"refine_stop": 0, "refine_fix": 1, "refine_fix_rejected": 1}


def test_a_declining_sample_keeps_its_own_target_not_the_models_text(scripted, make_sample) -> None:  # noqa: ANN001
    """Any answer without a readable call "matches" a sample with nothing to call, a garbled call written as text
    too (what the base model wrote for most live_irrelevance questions); a keep example built from that text would
    teach the model to write it."""
    garbled = '```json\n{"name": "cat joke", "arguments": [{"topic": "cats"'
    sample = dataclasses.replace(make_sample("none"), ground_truth=())
    records = {"none": {"stop": garbled, "fixes": [{"first": RIGHT, "kept": True, "answers": []}]}}
    for fmt in PromptFormat:
        keep, fix = refine_examples([sample], records, fmt)
        assert keep.target == NO_CALL_ANSWER and keep.messages[-2]["content"] == NO_CALL_ANSWER
        assert fix.target == NO_CALL_ANSWER and fix.messages[-2]["content"] == RIGHT


def test_keeping_and_changing_are_weighed_by_the_refine_config(make_sample) -> None:  # noqa: ANN001
    """keep_answers: distinct right answers of a calling sample become keep examples (the same call written twice is
    one); no_call_fix_fraction: the share of samples with nothing to call whose fixes (into the decline) are kept."""
    alike = RIGHT.replace("'Paris'", '"Paris"')  # the same call as RIGHT, written another way
    other = "[get_weather(city='Paris, France')]"  # another acceptable value: a second right answer
    truth = (GroundTruthCall("get_weather", {"city": ("Paris", "Paris, France")}),)
    sample = dataclasses.replace(make_sample("call"), ground_truth=truth)
    selection = {"call": {"answers": [RIGHT, alike, WRONG, other, CLOSE]}}
    records = {"call": {"stop": RIGHT, "fixes": []}}
    two = refine_examples([sample], records, PromptFormat.PYTHONIC, RefineConfig(keep_answers=3), selection)
    assert [(e.id, e.target, e.messages[-2]["content"]) for e in two] == [
        ("call#keep", RIGHT, RIGHT),
        ("call#keep1", other, other),
    ]
    assert [e.id for e in refine_examples([sample], records, PromptFormat.PYTHONIC, None, selection)] == ["call#keep"]

    declining = [dataclasses.replace(make_sample(f"none{i}"), ground_truth=()) for i in range(200)]
    fixes = {s.id: {"stop": None, "fixes": [{"first": RIGHT, "kept": True, "answers": []}]} for s in declining}
    every = refine_examples(declining, fixes, PromptFormat.PYTHONIC)
    half = refine_examples(declining, fixes, PromptFormat.PYTHONIC, RefineConfig(no_call_fix_fraction=0.5))
    assert len(every) == 200 and 70 < len(half) < 130
    assert {e.id for e in half} < {e.id for e in every}
    assert half == refine_examples(declining, fixes, PromptFormat.PYTHONIC, RefineConfig(no_call_fix_fraction=0.5))
