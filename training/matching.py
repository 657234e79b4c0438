"""The paper's "≈" between a model's answer and a ground truth that may accept several values per parameter: the
project's one ≈ rule (pass@k selection, refine checks, held-out scores).

Same multiset of tool names, same count, the same parameters per paired call, at most `max_differing_values` wrong
values in total, order free; a value is right when it is one of the acceptable ones, and a parameter whose acceptable
values include "" may be left out. Numbers compare by value (10 == 10.0, as BFCL's checker does), True is not 1.
`GroundTruthCall.exact` turns plain calls into a truth with one acceptable value per parameter.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import permutations
from typing import Any

from server.toolcalls import ParsedAnswer, ToolCall, parse_answer
from training.data import GroundTruthCall, Nested

_INF = float("inf")
_MAX_SEARCH = 7  # calls per answer beyond which pairing is greedy (7! pairings is still fast)


def answer_matches(answer: str | ParsedAnswer, truth: Sequence[GroundTruthCall], max_differing_values: int = 1) -> bool:
    """Whether a model's answer text ≈ the ground truth. A truth without calls is matched by any answer that makes
    no call (BFCL irrelevance: the model should point out that no function fits)."""
    parsed = parse_answer(answer) if isinstance(answer, str) else answer
    return calls_match(parsed.tool_calls, truth, max_differing_values)


def calls_match(predicted: Sequence[ToolCall], truth: Sequence[GroundTruthCall], max_differing_values: int = 1) -> bool:
    if len(predicted) != len(truth) or Counter(c.name for c in predicted) != Counter(c.name for c in truth):
        return False
    if not truth:
        return True
    costs = [[_call_cost(p, t) for t in truth] for p in predicted]
    return _best_pairing(costs) <= max_differing_values


def _best_pairing(costs: list[list[float]]) -> float:
    n = len(costs)
    if n <= _MAX_SEARCH:
        return min(sum(costs[i][j] for i, j in enumerate(order)) for order in permutations(range(n)))
    total, free = 0.0, set(range(n))
    for row in costs:  # greedy: cheapest free partner per predicted call
        j = min(free, key=lambda c: row[c])
        total += row[j]
        free.remove(j)
    return total


def _call_cost(predicted: ToolCall, truth: GroundTruthCall) -> float:
    """Wrong values in `predicted` against `truth`; inf when the name or the parameter set differs."""
    if predicted.name != truth.name:
        return _INF
    for key, values in truth.arguments.items():
        if key not in predicted.arguments and "" not in values:
            return _INF  # a required parameter is missing
    if any(key not in truth.arguments for key in predicted.arguments):
        return _INF
    return sum(not value_acceptable(value, truth.arguments[key]) for key, value in predicted.arguments.items())


def value_acceptable(value: Any, acceptable: Sequence[Any]) -> bool:
    return any(_value_matches(value, candidate) for candidate in acceptable)


def _value_matches(value: Any, candidate: Any) -> bool:
    if isinstance(candidate, Nested):
        if not isinstance(value, Mapping) or any(key not in candidate.fields for key in value):
            return False
        return all(
            value_acceptable(value[key], options) if key in value else "" in options
            for key, options in candidate.fields.items()
        )
    if _is_number(value) and _is_number(candidate):
        return float(value) == float(candidate)  # BFCL accepts 10 for 10.0; JSON cannot tell them apart anyway
    return _canonical(value) == _canonical(candidate)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
