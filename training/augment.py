"""Data augmentations that published small tool-callers train with (../shared/RESOURCES.md), as derived sources.

- `masked`: function and parameter names replaced by random strings, descriptions kept (Hammer): the model must read
  what a tool does, not guess from its name;
- `without_called`: a sample offering several tools with the called ones removed: nothing left fits, the right answer
  is no call (Hammer's irrelevance data: near misses that share the question's domain);
- `composed_parallel`: two single-call questions asked as one, both calls in the answer (parallel when they call the
  same function, parallel multiple when not): the training sources hold few parallel samples; optionally with
  distractor tools, so that "call every offered tool" does not fit them all;
- `shuffled_tools`: the offered tools in a seeded order, so that position says nothing about which one to call;
- `in_percent`: a sample that passes a stated "4%" as the fraction 0.04, again with the parameter described "in
  percentage" and 4 as the answer: BFCL's tools ask for either convention (`"Interest rate in percentage."` beside
  `"The annual interest rate (as a decimal)."` in one question), while the training sources only ever pass fractions.

Every function is deterministic in the sample ids and its salt.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from training.data import GroundTruthCall, Sample, seeded_shuffle

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _random_name(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


def masked(sample: Sample, salt: str = "mask") -> Sample:
    """The sample with every function renamed (5-15 letters) and every top-level parameter renamed (4-10 letters),
    consistently in the tools and the ground truth; descriptions, types and values unchanged."""
    rng = random.Random(f"{salt}:{sample.id}")
    functions: dict[str, str] = {}
    parameters: dict[str, dict[str, str]] = {}
    tools = []
    for tool in sample.tools:
        function = dict(tool["function"])
        old = function["name"]
        functions[old] = _random_name(rng, 5, 15)
        schema = dict(function.get("parameters") or {})
        properties = schema.get("properties") or {}
        renames = {name: _random_name(rng, 4, 10) for name in properties}
        parameters[old] = renames
        if properties:
            schema["properties"] = {renames[name]: value for name, value in properties.items()}
        if isinstance(schema.get("required"), list):
            schema["required"] = [renames.get(name, name) for name in schema["required"]]
        tools.append({**tool, "function": {**function, "name": functions[old], "parameters": schema}})
    if any(call.name not in functions for call in sample.ground_truth):
        return sample  # a ground truth naming a tool that is not offered: leave it as it is
    truth = tuple(
        GroundTruthCall(
            functions[call.name],
            {parameters[call.name].get(key, key): values for key, values in call.arguments.items()},
        )
        for call in sample.ground_truth
    )
    return replace(sample, id=f"{sample.id}~masked", tools=tuple(tools), ground_truth=truth)


def masked_fraction(samples: Sequence[Sample], fraction: float, salt: str = "mask") -> list[Sample]:
    """A seeded `fraction` of the samples masked in place of the original (the rest unchanged)."""
    chosen = {s.id for s in seeded_shuffle(samples, salt)[: round(fraction * len(samples))]}
    return [masked(s, salt) if s.id in chosen else s for s in samples]


def shuffled_tools(sample: Sample, salt: str = "order") -> Sample:
    tools = list(sample.tools)
    random.Random(f"{salt}:{sample.id}").shuffle(tools)
    return replace(sample, tools=tuple(tools))


def without_called(samples: Sequence[Sample]) -> list[Sample]:
    """No-call samples: each calling sample that offers other tools too, with the called ones taken away."""
    out = []
    for sample in samples:
        called = {call.name for call in sample.ground_truth}
        left = tuple(t for t in sample.tools if t["function"]["name"] not in called)
        if called and left and len(left) < len(sample.tools):
            source = f"{sample.source}:without"
            out.append(replace(sample, id=f"{sample.id}~without", source=source, tools=left, ground_truth=()))
    return out


def composed_parallel(
    samples: Sequence[Sample], count: int, salt: str = "compose", distractors: int = 0
) -> list[Sample]:
    """Up to `count` samples made of two single-call, single-turn samples: "Q1 Also, q2" with both calls as the
    answer and the union of their tools. Half (as far as they go) pair questions that call the same function (BFCL's
    parallel shape), the rest pair different ones (parallel multiple).

    Without distractors a sample offers exactly the tools it calls, so "call every offered tool" fits them all (the
    likely source of an adapter's unasked second calls on BFCL multiple, RESULTS.md). With `distractors`, each also
    offers that many tools of other samples (names not already offered), in a seeded order; its id ends in `+d<n>`,
    so that records made for the samples without them are never reused for these."""
    single = [s for s in seeded_shuffle(samples, salt) if len(s.ground_truth) == 1 and len(s.messages) == 1]
    by_function: dict[str, list[Sample]] = defaultdict(list)
    for sample in single:
        by_function[_signature(sample, sample.ground_truth[0].name)].append(sample)
    pairs: list[tuple[Sample, Sample]] = []
    for group in by_function.values():
        pairs += [(group[i], group[i + 1]) for i in range(0, len(group) - 1, 2)]
    same = pairs[: count // 2]
    rng = random.Random(salt)
    different: list[tuple[Sample, Sample]] = []
    for _ in range(4 * count):
        if len(same) + len(different) >= count or len(single) < 2:
            break
        a, b = rng.sample(single, 2)
        if a.ground_truth[0].name != b.ground_truth[0].name:
            different.append((a, b))
    out = []
    for a, b in same + different:
        tools = _union_tools(a.tools, b.tools)
        if tools is None:
            continue
        sid = f"{a.id}+{b.id}" + (f"+d{distractors}" if distractors else "")
        if distractors:
            tools = _with_distractors(tools, single, distractors, f"{salt}:{sid}")
        question = f"{_sentence(a.query)} Also, {_lower_first(b.query)}"
        sample = Sample(
            sid,
            f"{a.source}:composed",
            ({"role": "user", "content": question},),
            tools,
            a.ground_truth + b.ground_truth,
        )
        out.append(shuffled_tools(sample, salt) if distractors else sample)
    return out


def _with_distractors(
    tools: Sequence[dict[str, Any]], pool: Sequence[Sample], count: int, salt: str
) -> tuple[dict[str, Any], ...]:
    """`tools` plus `count` tools of samples in `pool` (taken in a seeded order) whose names are not offered yet."""
    offered = {t["function"]["name"] for t in tools}
    extra: list[dict[str, Any]] = []
    for tool in (tool for sample in seeded_shuffle(pool, salt) for tool in sample.tools):
        if len(extra) == count:
            break
        if tool["function"]["name"] not in offered:
            offered.add(tool["function"]["name"])
            extra.append(dict(tool))
    return (*tools, *extra)


def _signature(sample: Sample, name: str) -> str:
    function = next(t["function"] for t in sample.tools if t["function"]["name"] == name)
    return json.dumps(function, sort_keys=True)


def _union_tools(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...] | None:
    """The tools of both, once each; None when the same name means two different functions."""
    merged: dict[str, dict[str, Any]] = {}
    for tool in [*a, *b]:
        name = tool["function"]["name"]
        if name in merged and merged[name] != tool:
            return None
        merged[name] = dict(tool)
    return tuple(merged.values())


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _lower_first(text: str) -> str:
    text = text.strip()
    # keep acronyms and names ("NYC", "I") as they are
    return text[0].lower() + text[1:] if len(text) > 1 and text[0].isupper() and text[1].islower() else text


_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:%|percent\b)")
_SHARE = re.compile(r"rate|probabilit|percent|porcentaje|decimal|fraction|0 to 1|between 0 and 1", re.IGNORECASE)
# How the sources say a parameter is a fraction: dropped from the twin's description.
_AS_FRACTION = re.compile(
    r"\s*(\(as a decimal\)|as a decimal|,? ranging from 0 to 1|,? between 0 and 1)", re.IGNORECASE
)


def in_percent(samples: Sequence[Sample]) -> list[Sample]:
    """For each sample whose calls pass percentages its question states ("4%") as fractions (0.04), a twin in which
    those parameters are described "in percentage" and take the numbers as stated; its id ends in `~percent`. Only
    plain number arguments with one acceptable value are rewritten, and only samples where every call of a function
    converts the same parameters (a description is the function's, so no call may keep a fraction under it)."""
    out = []
    for sample in samples:
        stated = [float(p) for p in _PERCENT.findall(sample.query)]
        shares = _shares(sample)
        percents = [
            {
                key: percent
                for key, values in call.arguments.items()
                if (call.name, key) in shares and (percent := _as_stated(values, stated)) is not None
            }
            for call in sample.ground_truth
        ]
        converted: dict[str, set[frozenset[str]]] = defaultdict(set)  # function -> the parameter sets its calls convert
        for call, found in zip(sample.ground_truth, percents, strict=True):
            converted[call.name].add(frozenset(found))
        if not any(percents) or any(len(sets) > 1 for sets in converted.values()):
            continue
        parameters = {name: next(iter(sets)) for name, sets in converted.items()}
        tools = tuple(
            _described_in_percent(tool, parameters.get(tool["function"]["name"], frozenset())) for tool in sample.tools
        )
        truth = tuple(
            GroundTruthCall(
                call.name, {key: (found[key],) if key in found else values for key, values in call.arguments.items()}
            )
            for call, found in zip(sample.ground_truth, percents, strict=True)
        )
        twin = replace(
            sample, id=f"{sample.id}~percent", source=f"{sample.source}:percent", tools=tools, ground_truth=truth
        )
        out.append(twin)
    return out


def _shares(sample: Sample) -> set[tuple[str, str]]:
    """(function, parameter) of the parameters described as a rate or a share: a time window of 0.5 seconds is
    neither, even in a question that states "50%" about something else."""
    return {
        (tool["function"]["name"], name)
        for tool in sample.tools
        for name, spec in ((tool["function"].get("parameters") or {}).get("properties") or {}).items()
        if _SHARE.search(str(spec.get("description") or ""))
    }


def _as_stated(values: Sequence[Any], stated: Sequence[float]) -> float | int | None:
    """The stated percentage that `values` (one acceptable value, a fraction) writes as a fraction, if any."""
    value = values[0] if len(values) == 1 else None
    if not isinstance(value, float) or not 0 < value < 1:
        return None
    percent = next((p for p in stated if math.isclose(value * 100, p, abs_tol=1e-9)), None)
    return None if percent is None else int(percent) if percent.is_integer() else percent


def _described_in_percent(tool: dict[str, Any], parameters: Collection[str]) -> dict[str, Any]:
    if not parameters:
        return tool
    function = dict(tool["function"])
    schema = dict(function["parameters"])
    properties = dict(schema["properties"])
    for name in parameters:
        spec = dict(properties[name])
        first = str(spec["description"]).split(". ")[0].rstrip(". ")  # _shares found it there
        spec["description"] = _AS_FRACTION.sub("", first) + " in percentage (5 for 5%)."
        spec.pop("maximum", None)  # a fraction's bound (1), if the schema had one
        properties[name] = spec
    schema["properties"] = properties
    function["parameters"] = schema
    return {**tool, "function": function}
