"""Self-refinement at inference: the paper's Algorithm 1 (adaptive), vanilla refinement and self-consistency.

Pure logic over an `AnswerFn`: given the previous answer (None for the first one) it returns the next answer.
Round 0 is the initial answer A0; rounds 1..n are refine rounds. `iterations` counts refine rounds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import attrgetter
from typing import Any, TypeVar

DEFAULT_MAX_ITERATIONS = 5
MAX_ITERATIONS_LIMIT = 10


class RefineMode(StrEnum):
    NONE = "none"
    ADAPTIVE = "adaptive"
    VANILLA = "vanilla"
    SELF_CONSISTENCY = "self_consistency"


class StopReason(StrEnum):
    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NONE = "none"


@dataclass(frozen=True)
class Answer:
    """One round's answer. `canonical` is equal for two answers that are the same calls (or the same text)."""

    text: str
    canonical: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    attempted_call: bool = False  # the text looks like a tool call (whether or not it parsed)
    logprobs: tuple[Any, ...] | None = None  # the engine's per-token log-probabilities, when the client asked


AnswerFn = Callable[[str | None], Awaitable[Answer]]


@dataclass(frozen=True)
class RefineOutcome:
    final: Answer
    answers: tuple[Answer, ...]  # round 0 first
    iterations: int
    stop_reason: StopReason

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.answers)

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.answers)

    @property
    def changed_rounds(self) -> int:
        """Refine rounds whose answer differed from the previous round's."""
        return sum(a.canonical != b.canonical for a, b in zip(self.answers, self.answers[1:], strict=False))


T = TypeVar("T")


def majority(answers: Sequence[T], key: Callable[[T], Hashable] = attrgetter("canonical")) -> T:
    """The most frequent answer by `key` (an `Answer`'s canonical form); among equally frequent ones the latest wins.
    Self-consistency's vote, here and in the evaluation's per-round scores."""
    counts = Counter(map(key, answers))
    best = max(counts.values())
    return next(a for a in reversed(answers) if counts[key(a)] == best)


async def run_refinement(
    answer: AnswerFn, mode: RefineMode, max_iterations: int = DEFAULT_MAX_ITERATIONS
) -> RefineOutcome:
    if not 1 <= max_iterations <= MAX_ITERATIONS_LIMIT:
        raise ValueError(f"max_iterations must be in 1..{MAX_ITERATIONS_LIMIT}, got {max_iterations}")
    answers = [await answer(None)]
    if mode is RefineMode.NONE:
        return RefineOutcome(answers[0], tuple(answers), 0, StopReason.NONE)
    for iteration in range(1, max_iterations + 1):
        answers.append(await answer(answers[-1].text))
        if mode is RefineMode.ADAPTIVE and answers[-1].canonical == answers[-2].canonical:
            return RefineOutcome(answers[-1], tuple(answers), iteration, StopReason.CONVERGED)
    final = majority(tuple(answers[1:])) if mode is RefineMode.SELF_CONSISTENCY else answers[-1]
    return RefineOutcome(final, tuple(answers), max_iterations, StopReason.MAX_ITERATIONS)
