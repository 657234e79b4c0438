"""Model-aware data selection (pass@k): keep the samples the current model can already get right in k tries.

The current model samples k answers per sample in one engine call (n=k: one shared prefill); the sample is kept when
any answer ≈ the ground truth. Samples far beyond the model's reach are left for a later, stronger iteration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.engine.base import Engine, SamplingParams
from server.prompts import Prompt, PromptFormat
from training.config import SelectionConfig
from training.data import Sample
from training.matching import answer_matches
from training.resumable import map_resumable


def sample_seed(*parts: object) -> int:
    """A per-sample number in [0, 2**32) that depends only on its parts (the run's seed, the step, the sample), not on
    scheduling order."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:8], 16)


async def sample_answers(engine: Engine, prompt: Prompt, params: SamplingParams, adapter: str | None) -> list[str]:
    generation = await engine.generate(engine.encode_chat(prompt.messages, prompt.tools), params, adapter=adapter)
    return [completion.text for completion in generation.completions]


async def select(
    engine: Engine,
    samples: Sequence[Sample],
    config: SelectionConfig,
    records_path: Path,
    *,
    fmt: PromptFormat = PromptFormat.PYTHONIC,
    adapter: str | None = None,
    iteration: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """pass@k over `samples`; one record per sample: {"id", "answers", "matched", "selected"} (resumable)."""

    async def one(sample: Sample) -> dict[str, Any]:
        params = SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=sample_seed(config.seed, "select", iteration, sample.id),
            n=config.k,
        )
        answers = await sample_answers(engine, sample.prompt(fmt), params, adapter)
        matched = [answer_matches(a, sample.ground_truth, config.max_differing_values) for a in answers]
        return {"answers": answers, "matched": matched, "selected": any(matched)}

    return await map_resumable(
        samples,
        lambda s: s.id,
        one,
        records_path,
        concurrency=config.concurrency,
        desc=f"select it{iteration}",
        progress=progress,
    )
