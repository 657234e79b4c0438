"""Augmentations on the real training data: masked names, no-call samples without the called tool, composed
parallel questions, and the native-format prompts and targets training shares with the server."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from server.prompts import PromptFormat
from server.toolcalls import parse_answer
from training import augment
from training.data import GroundTruthCall, Sample, load_source
from training.evaluation import bfcl
from training.matching import answer_matches

LIVE_SIMPLE = {"type": "bfcl", "category": "live_simple"}
LIVE_MULTIPLE = {"type": "bfcl", "category": "live_multiple"}


def test_masked_renames_functions_and_parameters_consistently_and_keeps_descriptions() -> None:
    sample = next(s for s in load_source(LIVE_MULTIPLE) if len(s.tools) >= 3)
    masked = augment.masked(sample)
    assert masked.id == f"{sample.id}~masked" and masked.messages == sample.messages
    old_names = [t["function"]["name"] for t in sample.tools]
    new_names = [t["function"]["name"] for t in masked.tools]
    assert not set(old_names) & set(new_names) and all(5 <= len(n) <= 15 and n.isalpha() for n in new_names)
    for old, new in zip(sample.tools, masked.tools, strict=True):
        assert new["function"]["description"] == old["function"]["description"]
        old_props, new_props = old["function"]["parameters"]["properties"], new["function"]["parameters"]["properties"]
        assert list(old_props.values()) == list(new_props.values())  # same schemas, new names
        assert set(new["function"]["parameters"].get("required", [])) <= set(new_props)
    (call,) = masked.ground_truth
    tool = next(t for t in masked.tools if t["function"]["name"] == call.name)
    assert set(call.arguments) <= set(tool["function"]["parameters"]["properties"])
    # the masked answer is right for the masked sample, the original answer is not
    assert answer_matches(masked.target(), masked.ground_truth, 0)
    assert not answer_matches(sample.target(), masked.ground_truth, 1)
    assert augment.masked(sample) == masked  # seeded


def test_masked_fraction_masks_that_share_only() -> None:
    samples = load_source(LIVE_SIMPLE)
    mixed = load_source({"type": "masked", "of": LIVE_SIMPLE, "fraction": 0.25})
    assert len(mixed) == len(samples)
    assert sum(s.id.endswith("~masked") for s in mixed) == round(0.25 * len(samples))


def test_without_called_leaves_only_tools_that_were_not_called() -> None:
    originals = {s.id: s for s in load_source(LIVE_MULTIPLE)}
    negatives = load_source({"type": "without_called", "of": LIVE_MULTIPLE})
    assert len(negatives) > 0.9 * len(originals)
    for negative in negatives:
        original = originals[negative.id.removesuffix("~without")]
        called = {c.name for c in original.ground_truth}
        names = {t["function"]["name"] for t in negative.tools}
        assert names and not names & called and len(negative.tools) < len(original.tools)
        assert not negative.ground_truth and not parse_answer(negative.target()).tool_calls


def test_composed_parallel_asks_both_questions_and_expects_both_calls() -> None:
    parents = [LIVE_SIMPLE, {"type": "bfcl", "category": "exec_simple"}]
    singles = {s.id: s for p in parents for s in load_source(p)}
    composed = augment.composed_parallel(list(singles.values()), 40)
    assert len(composed) == 40
    same = [s for s in composed if len({c.name for c in s.ground_truth}) == 1]
    assert len(same) == 20  # half call one function twice (BFCL parallel), half two (parallel multiple)
    for sample in composed:
        a, b = (singles[i] for i in sample.id.split("+"))
        assert sample.ground_truth == a.ground_truth + b.ground_truth
        assert a.query.strip()[:20] in sample.query and " Also, " in sample.query
        assert {t["function"]["name"] for t in sample.tools} == {c.name for c in sample.ground_truth} | {
            t["function"]["name"] for t in a.tools + b.tools
        }
        parsed = parse_answer(sample.target(PromptFormat.NATIVE))
        assert len(parsed.tool_calls) == 2 and answer_matches(parsed, sample.ground_truth, 0)


def test_composed_parallel_with_distractors_offers_tools_it_does_not_call() -> None:
    spec = {"type": "composed_parallel", "count": 40, "of": [LIVE_SIMPLE, {"type": "bfcl", "category": "exec_simple"}]}
    plain = {s.id: s for s in load_source(spec)}
    composed = load_source(spec | {"distractors": 2})
    assert len(composed) == 40 and not set(plain) & {s.id for s in composed}  # no record of the plain ones applies
    orders = set()
    for sample in composed:
        twin = plain[sample.id.removesuffix("+d2")]
        assert sample.query == twin.query and sample.ground_truth == twin.ground_truth
        names = [t["function"]["name"] for t in sample.tools]
        assert len(names) == len(set(names)) == len(twin.tools) + 2  # two more, none offered twice
        assert all(tool in sample.tools for tool in twin.tools)
        orders.add(names.index(twin.tools[0]["function"]["name"]))
        assert answer_matches(sample.target(PromptFormat.NATIVE), sample.ground_truth, 0)
    assert len(orders) > 1  # the called tools are not always first
    assert [s.tools for s in load_source(spec | {"distractors": 2})] == [s.tools for s in composed]  # seeded


def test_native_prompt_and_target_are_what_the_server_sends_and_parses() -> None:
    (sample,) = [s for s in load_source({"type": "bfcl", "category": "live_parallel"}) if s.id == "live_parallel_0-0-0"]
    prompt = sample.prompt(PromptFormat.NATIVE)
    assert prompt.messages == sample.messages and list(prompt.tools) == list(sample.tools)
    target = sample.target(PromptFormat.NATIVE)
    # one fenced JSON block, no `<tool_call>` tags (the embedded model cannot write them: training/data.py)
    assert target.startswith("```json\n") and "<tool_call>" not in target
    assert len(parse_answer(target).tool_calls) == 2
    assert answer_matches(target, sample.ground_truth, 0)
    # one converter for training and evaluation: BFCL's own, with its Python hint
    question = next(q for q in bfcl.load_category("live_parallel") if q.id == sample.id)
    assert list(sample.tools) == bfcl.openai_tools(question.functions)
    assert "Python 3 syntax" in json.dumps(sample.tools)


def _rates(sample: Sample) -> list[Any]:
    return [call.arguments["interest_rate"] for call in sample.ground_truth]


def test_in_percent_asks_for_the_stated_percentages_where_the_description_says_so() -> None:
    (original,) = [s for s in load_source({"type": "bfcl", "category": "exec_parallel"}) if s.id == "exec_parallel_35"]
    assert "3.5%" in original.query and _rates(original) == [(0.035,), (0.04,), (0.025,), (0.03,)]
    (twin,) = augment.in_percent([original])
    assert twin.id == "exec_parallel_35~percent" and twin.messages == original.messages
    assert _rates(twin) == [(3.5,), (4,), (2.5,), (3,)]  # each call its own rate, as the question states it
    (tool,) = twin.tools
    description = tool["function"]["parameters"]["properties"]["interest_rate"]["description"]
    assert description == "The interest rate of the loan in percentage (5 for 5%)."  # "ranging from 0 to 1" gone
    assert answer_matches(twin.target(PromptFormat.NATIVE), twin.ground_truth, 0)
    assert not answer_matches(original.target(PromptFormat.NATIVE), twin.ground_truth, 1)


def test_in_percent_leaves_numbers_that_are_not_shares_and_functions_it_cannot_describe_one_way() -> None:
    beats = [s for s in load_source(LIVE_SIMPLE) if s.id == "live_simple_72-36-0"]
    assert "50%" in beats[0].query  # a capture percentage; the time window of 0.5 seconds is not a share
    assert augment.in_percent(beats) == []
    (loans,) = [s for s in load_source({"type": "bfcl", "category": "exec_parallel"}) if s.id == "exec_parallel_35"]
    first, *rest = loans.ground_truth
    unstated = GroundTruthCall(first.name, {**first.arguments, "interest_rate": (0.061,)})  # 6.1% is not asked
    assert augment.in_percent([replace(loans, ground_truth=(unstated, *rest))]) == []
