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
from server.prompts import Prompt, PromptFormat
from training.config import RefineConfig, SelectionConfig
from training.data import Sample
from training.matching import answer_matches
from training.resumable import map_resumable
from training.select import sample_answers, sample_seed


@dataclass(frozen=True)
class Example:
    """One SFT example: the chat messages before the answer (and the tools the native template renders), and the
    answer the model must learn to write."""

    id: str
    messages: tuple[dict[str, Any], ...]
    target: str
    kind: str  # "direct" | "refine_stop" | "refine_fix" | "followup_answer" | ...
    tools: tuple[dict[str, Any], ...] | None = None

    @classmethod
    def of(cls, id: str, prompt: Prompt, target: str, kind: str) -> Example:
        return cls(id, prompt.messages, target, kind, prompt.tools)

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.messages, self.tools)

    def to_json(self) -> dict[str, Any]:
        data = {"id": self.id, "messages": list(self.messages), "target": self.target, "kind": self.kind}
        return data | ({"tools": list(self.tools)} if self.tools else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Example:
        tools = tuple(data["tools"]) if data.get("tools") else None
        return cls(data["id"], tuple(data["messages"]), data["target"], data["kind"], tools)


def refine_prompt(sample: Sample, previous_answer: str, fmt: PromptFormat) -> Prompt:
    """The context of a refine round, exactly as the server builds it (`Prompt.with_refinement`)."""
    return sample.prompt(fmt).with_refinement(previous_answer)


def direct_examples(samples: Sequence[Sample], fmt: PromptFormat) -> list[Example]:
    return [Example.of(s.id, s.prompt(fmt), s.target(fmt), "direct") for s in samples]


async def build_refine_examples(
    engine: Engine,
    selected: Sequence[Sample],
    selection: Mapping[str, Mapping[str, Any]],
    config: RefineConfig,
    selection_config: SelectionConfig,
    records_path: Path,
    *,
    fmt: PromptFormat = PromptFormat.PYTHONIC,
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
        answers = await sample_answers(engine, refine_prompt(sample, first, fmt), params, adapter)
        kept = any(answer_matches(a, sample.ground_truth, config.max_differing_values) for a in answers)
        return {"kind": "refine_fix", "first": first, "target": sample.target(fmt), "kept": kept, "answers": answers}

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
        Example.of(f"{sid}#refine", refine_prompt(by_id[sid], r["first"], fmt), r["target"], r["kind"])
        for sid, r in records.items()
        if r["kept"]
    ]
