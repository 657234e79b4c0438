"""The refine modes against a scripted answer function (pure logic; the real model is in test_api.py)."""

from __future__ import annotations

import asyncio

import pytest

from server.refine import Answer, RefineMode, StopReason, majority, run_refinement


class Script:
    """Returns the scripted answers in order and records the previous answer each round was shown."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.seen: list[str | None] = []

    async def __call__(self, previous: str | None) -> Answer:
        self.seen.append(previous)
        text = self.texts[len(self.seen) - 1]
        return Answer(
            text=text,
            canonical=text.replace(" ", ""),
            prompt_tokens=10,
            completion_tokens=len(text),
            finish_reason="stop",
        )


def run(script: Script, mode: RefineMode, n: int = 5):
    return asyncio.run(run_refinement(script, mode, n))


def test_none_answers_once() -> None:
    script = Script("[f(a=1)]")
    outcome = run(script, RefineMode.NONE)
    assert (outcome.iterations, outcome.stop_reason, outcome.final.text) == (0, StopReason.NONE, "[f(a=1)]")
    assert script.seen == [None]


def test_adaptive_stops_when_two_consecutive_answers_match() -> None:
    script = Script("[f(a=1)]", "[f(a=2)]", "[f(a = 2)]", "never asked")
    outcome = run(script, RefineMode.ADAPTIVE)
    assert outcome.stop_reason is StopReason.CONVERGED
    assert outcome.iterations == 2
    assert outcome.final.text == "[f(a = 2)]"
    # each round sees only the previous answer
    assert script.seen == [None, "[f(a=1)]", "[f(a=2)]"]
    assert outcome.changed_rounds == 1


def test_adaptive_converges_at_first_refine_round() -> None:
    outcome = run(Script("[f(a=1)]", "[f(a=1)]"), RefineMode.ADAPTIVE)
    assert (outcome.iterations, outcome.stop_reason) == (1, StopReason.CONVERGED)


def test_adaptive_stops_at_n() -> None:
    script = Script("a", "b", "c", "d")
    outcome = run(script, RefineMode.ADAPTIVE, n=3)
    assert (outcome.iterations, outcome.stop_reason, outcome.final.text) == (
        3,
        StopReason.MAX_ITERATIONS,
        "d",
    )
    assert len(script.seen) == 4


def test_usage_sums_every_round() -> None:
    outcome = run(Script("ab", "abc", "abc"), RefineMode.ADAPTIVE)
    assert outcome.prompt_tokens == 30
    assert outcome.completion_tokens == 2 + 3 + 3


def test_vanilla_always_runs_n_rounds_and_keeps_the_last() -> None:
    script = Script("x", "x", "y", "y")
    outcome = run(script, RefineMode.VANILLA, n=3)
    assert (outcome.iterations, outcome.stop_reason, outcome.final.text) == (
        3,
        StopReason.MAX_ITERATIONS,
        "y",
    )
    assert len(outcome.answers) == 4


def test_self_consistency_takes_the_majority_of_refine_rounds() -> None:
    # round 0 ("z") is not counted; rounds 1..4: a, b, a, b -> a tie, the latest (b) wins
    assert run(Script("z", "a", "b", "a", "b"), RefineMode.SELF_CONSISTENCY, n=4).final.text == "b"
    assert run(Script("z", "a", "b", "a", "c"), RefineMode.SELF_CONSISTENCY, n=4).final.text == "a"


def test_majority_compares_canonical_forms() -> None:
    answers = tuple(Answer(t, t.replace(" ", ""), 0, 0, "stop") for t in ["f(a=1)", "g()", "f(a = 1)"])
    assert majority(answers).text == "f(a = 1)"


@pytest.mark.parametrize("n", [0, 11])
def test_iteration_bounds(n: int) -> None:
    with pytest.raises(ValueError):
        run(Script("a"), RefineMode.ADAPTIVE, n=n)
