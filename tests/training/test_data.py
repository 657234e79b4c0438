"""Loaders on the real data that ships in packages (bfcl-eval, nestful-wrapper), and the chat JSONL format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.prompts import SYSTEM_PROMPT
from server.toolcalls import ToolCall, parse_answer
from training.data import (
    NO_CALL_ANSWER,
    GroundTruthCall,
    Nested,
    Sample,
    content_words,
    evaluation_questions,
    load_bfcl,
    load_chat_jsonl,
    load_nestful,
    load_source,
    normalised_question,
    split,
    stated_first,
)
from training.matching import answer_matches


def test_bfcl_live_multiple_keeps_every_acceptable_value_and_renders_the_first() -> None:
    samples = {s.id: s for s in load_bfcl("live_multiple")}
    assert len(samples) == 1052  # of 1053: one repeats a non-live question word for word
    # BFCL: get_current_weather(location=["Shanghai, China"], unit=["", "metric"]) for "... using the metric system?"
    sample = samples["live_multiple_5-3-0"]
    (call,) = sample.ground_truth
    assert call.arguments["unit"] == ("metric", "")  # stated in the question: preferred over leaving it out
    assert sample.target() == "[get_current_weather(location='Shanghai, China', unit='metric')]"
    assert answer_matches("[get_current_weather(location='Shanghai, China')]", sample.ground_truth, 0)
    unstated = stated_first(GroundTruthCall("f", {"unit": ("", "metric")}), "weather in shanghai?")
    assert unstated.preferred() == ToolCall("f", {})  # "" first and not stated: left out
    # Nested dict parameters keep acceptable values per field.
    nested = samples["live_multiple_0-0-0"].ground_truth[0].arguments["new_preferences"][0]
    assert isinstance(nested, Nested)
    assert "served 'boiling hot'" in nested.fields["special_instructions"]


def test_bfcl_prompts_are_the_servers_pythonic_prompt_with_json_schema_types() -> None:
    sample = load_bfcl("live_parallel")[0]
    system = sample.prompt().messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith(SYSTEM_PROMPT.split("\n")[0])
    function = sample.tools[0]["function"]
    assert function["parameters"]["type"] == "object"  # BFCL writes "dict"; clients send JSON Schema
    assert sample.prompt().messages[-1] == {"role": "user", "content": sample.query}


def test_bfcl_irrelevance_has_no_calls_and_exec_answers_parse() -> None:
    irrelevance = load_bfcl("live_irrelevance")
    assert len(irrelevance) > 800 and all(not s.ground_truth for s in irrelevance)
    assert irrelevance[0].target() == NO_CALL_ANSWER
    assert answer_matches("Sorry, none of these functions fits.", irrelevance[0].ground_truth)
    assert not answer_matches("[f(a=1)]", irrelevance[0].ground_truth)
    exec_simple = load_bfcl("exec_simple")
    assert len(exec_simple) == 100
    assert exec_simple[0].ground_truth[0] == GroundTruthCall(
        "calc_binomial_probability", {"n": (20,), "k": (5,), "p": (0.6,)}
    )


def test_mismatched_offers_each_question_unrelated_tools_and_expects_no_call() -> None:
    source = {"type": "bfcl", "category": "live_simple"}
    originals = {s.id: s for s in load_source(source)}
    negatives = load_source({"type": "mismatched", "of": source})
    assert len(negatives) > 0.9 * len(originals)  # nearly every question finds unrelated tools
    for negative in negatives:
        own_id, donor_id = negative.id.split("~")
        own, donor = originals[own_id], originals[donor_id]
        assert own_id != donor_id and negative.messages == own.messages and negative.tools == donor.tools
        assert not negative.ground_truth and negative.target() == NO_CALL_ANSWER
        assert not content_words(own.query) & content_words(json.dumps(donor.tools))
    weather = "What's the weather like in Boston today?"
    assert {"weather", "boston", "today"} <= content_words(weather)
    assert {"weather", "current"} <= content_words('{"name": "getCurrentWeather"}')  # camelCase split, no "name"
    limited = load_source({"type": "mismatched", "of": source, "limit": 20})
    assert len(limited) == 20 and limited == load_source({"type": "mismatched", "of": source, "limit": 20})


def test_every_loaded_target_matches_its_own_ground_truth() -> None:
    for source in (
        {"type": "bfcl", "category": c} for c in ("live_multiple", "live_parallel_multiple", "exec_parallel")
    ):
        for sample in load_source(source):
            assert answer_matches(sample.target(), sample.ground_truth, 0), sample.id


@pytest.mark.parametrize(
    "category", ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "chatable"]
)
def test_evaluation_categories_are_refused(category: str) -> None:
    with pytest.raises(ValueError, match="evaluation category"):
        load_bfcl(category)


def test_training_samples_never_repeat_an_evaluation_question() -> None:
    evaluation = evaluation_questions()
    assert len(evaluation) > 1000
    kept = load_bfcl("live_irrelevance")
    assert 0 < 884 - len(kept) < 20  # the few questions BFCL repeats between live_irrelevance and non-live
    assert not any(normalised_question(s.query) in evaluation for s in kept)


def test_nestful_keeps_the_first_turn_calls_and_offers_their_tools() -> None:
    samples = load_nestful("glaive")
    assert 100 < len(samples) <= 169
    first = samples[0]  # calculate_route + find_song_lyrics; calculate_pace refers to $var1$ and waits a turn
    assert [c.name for c in first.ground_truth] == ["calculate_route", "find_song_lyrics"]
    offered = {t["function"]["name"] for t in first.tools}
    assert {"calculate_route", "find_song_lyrics"} <= offered and len(offered) == 5
    assert all("$var" not in json.dumps(c.arguments) for s in samples for c in s.ground_truth)
    assert any("$100" in json.dumps(c.arguments) for s in samples for c in s.ground_truth)  # prices are not refs
    assert load_nestful("glaive")[0] == first  # distractors are seeded


def test_chat_jsonl(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    rows = [
        {
            "id": "a",
            "tools": tools,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "call f"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
            ],
        },
        {"tools": tools, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = load_chat_jsonl(path)
    assert first.id == "a" and len(first.messages) == 2
    assert first.ground_truth == (GroundTruthCall("f", {"x": (1,)}),)
    assert first.target() == "[f(x=1)]"
    assert "Be brief." in first.prompt().messages[0]["content"]
    assert second.ground_truth == () and second.id == "data-1"


def test_split_is_stable_and_disjoint() -> None:
    samples = load_bfcl("live_parallel_multiple")
    a = split(samples, heldout=5, max_train=10)
    b = split(samples, heldout=5, max_train=15)
    assert [s.id for s in a.heldout] == [s.id for s in b.heldout]
    assert not {s.id for s in b.train} & {s.id for s in b.heldout}
    assert [s.id for s in b.train[:10]] == [s.id for s in a.train]


def test_no_call_sample_target_is_text() -> None:
    sample = Sample("x", "t", ({"role": "user", "content": "hi"},), (), ())
    assert parse_answer(sample.target()).tool_calls == ()
