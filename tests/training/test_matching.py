"""The ≈ rule with acceptable values; equal to server.toolcalls.approx_match on single-valued truths."""

from __future__ import annotations

import pytest

from server.toolcalls import ToolCall, approx_match
from training.data import GroundTruthCall, Nested
from training.matching import answer_matches, calls_match

TRUTH = (
    GroundTruthCall("book", {"city": ("Paris", "paris"), "nights": (2,), "breakfast": ("", True)}),
    GroundTruthCall("weather", {"city": ("Paris",)}),
)


def test_acceptable_values_and_omission() -> None:
    assert answer_matches("[book(city='paris', nights=2), weather(city='Paris')]", TRUTH, 0)
    assert answer_matches("[weather(city='Paris'), book(city='Paris', nights=2.0, breakfast=True)]", TRUTH, 0)
    assert not answer_matches("[book(city='Paris'), weather(city='Paris')]", TRUTH, 1)  # required `nights` missing


def test_one_wrong_value_is_approximately_right() -> None:
    answer = "[book(city='Rome', nights=2), weather(city='Paris')]"
    assert not answer_matches(answer, TRUTH, 0)
    assert answer_matches(answer, TRUTH, 1)
    assert not answer_matches("[book(city='Rome', nights=3), weather(city='Paris')]", TRUTH, 1)


def test_names_and_counts_must_agree() -> None:
    assert not answer_matches("[book(city='Paris', nights=2)]", TRUTH, 1)
    assert not answer_matches("[book(city='Paris', nights=2), book(city='Paris', nights=2)]", TRUTH, 5)
    assert not answer_matches("I cannot help.", TRUTH, 1)


def test_nested_acceptable_values() -> None:
    truth = (GroundTruthCall("order", {"prefs": (Nested({"size": ("large",), "milk": ("", "oat")}),)}),)
    assert answer_matches("[order(prefs={'size': 'large'})]", truth, 0)
    assert answer_matches("[order(prefs={'size': 'large', 'milk': 'oat'})]", truth, 0)
    assert not answer_matches("[order(prefs={'size': 'large', 'sugar': 1})]", truth, 0)
    assert truth[0].preferred() == ToolCall("order", {"prefs": {"size": "large"}})


@pytest.mark.parametrize(
    "predicted",
    [
        [ToolCall("f", {"a": 1, "b": "x"})],
        [ToolCall("f", {"a": 2, "b": "x"})],
        [ToolCall("f", {"a": 2, "b": "y"})],
        [ToolCall("f", {"a": 1})],
        [ToolCall("g", {"a": 1, "b": "x"})],
        [ToolCall("f", {"a": 1, "b": "x"}), ToolCall("f", {"a": 1, "b": "x"})],
    ],
)
@pytest.mark.parametrize("limit", [0, 1])
def test_agrees_with_the_servers_rule_on_exact_truths(predicted: list[ToolCall], limit: int) -> None:
    truth = [ToolCall("f", {"a": 1, "b": "x"})]
    assert calls_match(predicted, [GroundTruthCall.exact(c) for c in truth], limit) == approx_match(
        predicted, truth, limit
    )
