"""Self-refine training data: `[system, user, A1, refine prompt, A]`, where A1 is the model's own answer.

- A1 right (exactly; A = A1): the sample teaches when to stop refining; A1 is kept verbatim as the target (for a
  sample with nothing to call, its own target: the model's non-call answers include garbled calls written as text).
- A1 wrong: the model samples k refinements of it (one n=k call); the example is kept only when one of them ≈ the
  ground truth (the correction is within the model's reach), with the ground truth as the target. An A1 that is
  itself ≈ the truth (one value off) would pass that check by repeating itself, and its example would teach the model
  to change a value it has no reason to doubt (on BFCL, often one of the accepted values): such a near miss is kept
  only when a refinement is exactly right.
A1 comes from the answers sampled in selection (every distinct wrong one is a candidate), so the data follows the
model's own mistakes; with `RefineConfig.first_answer: greedy` the model's greedy answer comes first (the A0 that
adaptive refinement starts from at inference). `keep_answers` and `no_call_fix_fraction` set how keeping and changing
are weighed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.base import Engine, SamplingParams
from server.prompts import Prompt, PromptFormat
from server.toolcalls import canonical
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
    """Refine examples from the answers sampled in selection (resumable through `records_path`):

    - "keep your answer": the first of them that is exactly right, as A1 and as the target (teaches when to stop);
    - fixes: every distinct wrong answer is a candidate A1 (the model's own, on-policy mistakes); the model samples
      k refinements of it, and when one ≈ the ground truth (the paper's Eq. 3: the fix is within its reach; see
      `fix_reached`) the example [.., A1, refine prompt] → ground truth is kept, else the candidate is rejected."""

    async def one(sample: Sample) -> dict[str, Any]:
        answers = [a.strip() for a in selection[sample.id]["answers"]]
        greedy = None
        if config.first_answer == "greedy":  # first: the answer adaptive refinement would start from
            params = SamplingParams(max_tokens=selection_config.max_new_tokens)
            greedy = (await sample_answers(engine, sample.prompt(fmt), params, adapter))[0].strip()
            answers = [greedy, *answers]
        right = right_answers(sample, answers)
        wrong = list({canonical(a): a for a in reversed(answers) if a not in right}.values())[::-1]
        wrong = wrong[: config.max_fixes]  # the first ones the model wrote (None: every one)
        fixes = []
        for index, first in enumerate(wrong):
            params = SamplingParams(
                max_tokens=selection_config.max_new_tokens,
                temperature=config.temperature,
                top_p=selection_config.top_p,
                seed=sample_seed(selection_config.seed, "refine", iteration, sample.id, index),
                n=config.k,
            )
            refined = await sample_answers(engine, refine_prompt(sample, first, fmt), params, adapter)
            kept = fix_reached(first, refined, sample, config.max_differing_values)
            fixes.append({"first": first, "kept": kept, "answers": refined})
        record = {"stop": right[0] if right else None, "fixes": fixes}
        return record | ({"greedy": greedy} if greedy is not None else {})

    records = await map_resumable(
        selected,
        lambda s: s.id,
        one,
        records_path,
        concurrency=selection_config.concurrency,
        desc=f"refine it{iteration}",
        progress=progress,
    )
    return refine_examples(selected, records, fmt, config, selection)


def right_answers(sample: Sample, answers: Sequence[str]) -> list[str]:
    """The answers that exactly match the ground truth, in the order they were sampled."""
    return [a for a in answers if answer_matches(a, sample.ground_truth, 0)]


def fix_reached(first: str, refined: Sequence[str], sample: Sample, max_differing_values: int) -> bool:
    """Eq. 3: whether a refinement of the wrong answer `first` ≈ the ground truth; exactly, where `first` ≈ it."""
    tolerance = 0 if answer_matches(first, sample.ground_truth, max_differing_values) else max_differing_values
    return any(answer_matches(a, sample.ground_truth, tolerance) for a in refined)


def refine_examples(
    selected: Sequence[Sample],
    records: Mapping[str, Mapping[str, Any]],
    fmt: PromptFormat,
    config: RefineConfig | None = None,
    selection: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Example]:
    """The examples a refine step's records make: keep-your-answer ones (up to `config.keep_answers` distinct right
    answers of a calling sample, from `selection`'s answers), and the fixes that were kept (those into words only for
    `config.no_call_fix_fraction` of the samples)."""
    config = config or RefineConfig()
    by_id = {s.id: s for s in selected}
    examples = []
    for sid, record in records.items():
        sample = by_id[sid]
        for index, kept in enumerate(_kept_answers(sample, record, fmt, config.keep_answers, selection)):
            suffix = "" if index == 0 else str(index)
            examples.append(Example.of(f"{sid}#keep{suffix}", refine_prompt(sample, kept, fmt), kept, "refine_stop"))
        if not sample.ground_truth and sample_seed("no-call-fix", sid) / 2**32 >= config.no_call_fix_fraction:
            continue
        for index, fix in enumerate(record["fixes"]):
            if fix["kept"]:
                context = refine_prompt(sample, fix["first"], fmt)
                examples.append(Example.of(f"{sid}#fix{index}", context, sample.target(fmt), "refine_fix"))
    return examples


def _kept_answers(
    sample: Sample,
    record: Mapping[str, Any],
    fmt: PromptFormat,
    count: int,
    selection: Mapping[str, Mapping[str, Any]] | None,
) -> list[str]:
    if record["stop"] is None:
        return []
    if not sample.ground_truth:
        # A sample with nothing to call "matches" any answer without a readable call, a garbled one included:
        # its keep example shows and teaches its own target (the decline, or the answer in words), not that text.
        return [sample.target(fmt)]
    answers = [a.strip() for a in selection[sample.id]["answers"]] if selection and count > 1 else []
    distinct = {canonical(record["stop"]): record["stop"]}
    for answer in right_answers(sample, answers):
        distinct.setdefault(canonical(answer), answer)
    return list(distinct.values())[:count]


def refine_counts(records: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Stop examples, and fix candidates kept and rejected, over a refine step's records."""
    fixes = [fix for record in records.values() for fix in record["fixes"]]
    return {
        "refine_stop": sum(record["stop"] is not None for record in records.values()),
        "refine_fix": sum(fix["kept"] for fix in fixes),
        "refine_fix_rejected": sum(not fix["kept"] for fix in fixes),
    }
