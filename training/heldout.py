"""The held-out score of one model: greedy answers through the engine with the server's prompt (the run's format),
scored by exact match (`max_differing_values=0`, every value acceptable) and by the paper's ≈ (at most one wrong value).

This is the loop's own quick check on data from the training sources that is never trained on; the BFCL benchmark
evaluation lives in `training/evaluation/`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.engine.base import Engine, SamplingParams
from server.prompts import PromptFormat
from training.config import HeldoutConfig
from training.data import Sample
from training.matching import answer_matches
from training.resumable import map_resumable
from training.select import sample_answers


async def evaluate(
    engine: Engine,
    samples: Sequence[Sample],
    config: HeldoutConfig,
    records_path: Path,
    *,
    fmt: PromptFormat = PromptFormat.PYTHONIC,
    adapter: str | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, Any]:
    """{"n", "exact", "approx"} (accuracies in [0, 1]); per-sample answers go to `records_path` (resumable)."""
    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0)

    async def one(sample: Sample) -> dict[str, Any]:
        (text,) = await sample_answers(engine, sample.prompt(fmt), params, adapter)
        return {
            "answer": text,
            "exact": answer_matches(text, sample.ground_truth, 0),
            "approx": answer_matches(text, sample.ground_truth, 1),
        }

    records = await map_resumable(
        samples, lambda s: s.id, one, records_path, concurrency=config.concurrency, desc=desc, progress=progress
    )
    n = len(records)
    return {
        "n": n,
        "exact": round(sum(r["exact"] for r in records.values()) / n, 4) if n else 0.0,
        "approx": round(sum(r["approx"] for r in records.values()) / n, 4) if n else 0.0,
    }
