"""Self-refine training data: `[system, user, A1, refine prompt, A]`, where A1 is the model's own answer.

- A1 already right (exactly; A = A1): the sample teaches when to stop refining; A1 is kept verbatim as the target.
- A1 wrong: the model samples k refinements of it (one n=k call); the sample is kept only when one of them ≈ the
  ground truth (the correction is within the model's reach), with the ground truth as the target.
A1 is the model's first sampled answer from selection, so the data follows the model's own mistakes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.base import Engine, SamplingParams
from server.prompts import REFINE_PROMPT
from training.config import RefineConfig, SelectionConfig
from training.data import Sample
from training.matching import answer_matches
from training.resumable import map_resumable
from training.select import sample_answers, sample_seed


@dataclass(frozen=True)
class Example:
    """One SFT example: the chat messages before the answer, and the answer the model must learn to write."""

    id: str
    messages: tuple[dict[str, Any], ...]
    target: str
    kind: str  # "direct" | "refine_stop" | "refine_fix"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": list(self.messages), "target": self.target, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Example:
        return cls(data["id"], tuple(data["messages"]), data["target"], data["kind"])


def refine_messages(sample: Sample, previous_answer: str) -> list[dict[str, Any]]:
    """The context of a refine round, exactly as the server builds it (`Prompt.with_refinement`)."""
    return [
        *sample.prompt_messages(),
        {"role": "assistant", "content": previous_answer},
        {"role": "user", "content": REFINE_PROMPT},
    ]


def direct_examples(samples: Sequence[Sample]) -> list[Example]:
    return [Example(s.id, tuple(s.prompt_messages()), s.target(), "direct") for s in samples]


async def build_refine_examples(
    engine: Engine,
    selected: Sequence[Sample],
    selection: Mapping[str, Mapping[str, Any]],
    config: RefineConfig,
    selection_config: SelectionConfig,
    records_path: Path,
    *,
    adapter: str | None = None,
    iteration: int = 0,
    progress: bool = True,
) -> list[Example]:
    """One refine example per selected sample whose check passes (resumable through `records_path`)."""

    async def one(sample: Sample) -> dict[str, Any]:
        first = selection[sample.id]["answers"][0].strip()
        if answer_matches(first, sample.ground_truth, 0):
            return {"kind": "refine_stop", "first": first, "target": first, "kept": True}
        params = SamplingParams(
            max_tokens=selection_config.max_new_tokens,
            temperature=config.temperature,
            top_p=selection_config.top_p,
            seed=sample_seed(selection_config.seed, "refine", iteration, sample.id),
            n=config.k,
        )
        answers = await sample_answers(engine, refine_messages(sample, first), params, adapter)
        kept = any(answer_matches(a, sample.ground_truth, config.max_differing_values) for a in answers)
        return {"kind": "refine_fix", "first": first, "target": sample.target(), "kept": kept, "answers": answers}

    records = await map_resumable(
        selected,
        lambda s: s.id,
        one,
        records_path,
        concurrency=selection_config.concurrency,
        desc=f"refine it{iteration}",
        progress=progress,
    )
    by_id = {s.id: s for s in selected}
    return [
        Example(f"{sid}#refine", tuple(refine_messages(by_id[sid], r["first"])), r["target"], r["kind"])
        for sid, r in records.items()
        if r["kept"]
    ]
