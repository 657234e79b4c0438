"""Benchmark: continuous batching in the transformers engine against batches that admit nobody until they end.

Mixed traffic as an inference server sees it: most requests want a short answer, a few a long one (a JSON array
of 40 numbers that the schema keeps from ending early). All are sent at once, `--concurrency` at a time, to an
engine with continuous batching and to one without; both engines live in this one process and run the same requests
in the same order, taking turns in ABBA rounds (`--rounds`) so that background load drifting over the run weighs on
both alike. Reported: wall time, completion tokens per second, and the latency of the short
requests (p50 / p95), plus the gains of continuous batching: its throughput over the static one's, and the static
short-request p50 over its own.

    .venv/bin/python tests/bench/bench_continuous_batching.py --requests 48 --concurrency 8 --out /tmp/cb.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from server.engine import SamplingParams  # noqa: E402
from server.engine.transformers import TransformersEngine  # noqa: E402
from server.model_store import resolve  # noqa: E402

SHORT = SamplingParams(max_tokens=8)
LONG = SamplingParams(max_tokens=96, json_schema={"type": "array", "items": {"type": "integer"}, "minItems": 40})
QUESTIONS = ("Say hi.", "Name a color.", "What is 2 + 2?", "Name a fruit.", "Spell cat.", "Name a month.")


def workload(requests: int, long_every: int) -> list[tuple[str, SamplingParams]]:
    return [(QUESTIONS[i % len(QUESTIONS)], LONG if i % long_every == 0 else SHORT) for i in range(requests)]


async def run(engine: TransformersEngine, work: list[tuple[str, SamplingParams]], concurrency: int) -> dict[str, Any]:
    """One round: wall time, completion tokens, and each short request's latency."""
    gate = asyncio.Semaphore(concurrency)
    short_latencies: list[float] = []
    tokens = 0

    async def one(question: str, params: SamplingParams) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            result = await engine.generate([{"role": "user", "content": question}], params)
            tokens += result.completion_tokens
            if params is SHORT:
                short_latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(q, p) for q, p in work))
    return {"wall": time.perf_counter() - start, "tokens": tokens, "short": short_latencies}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(r["wall"] for r in rounds)
    short = [latency for r in rounds for latency in r["short"]]
    return {
        "rounds": len(rounds),
        "wall_s": round(wall, 2),
        "completion_tok_per_s": round(sum(r["tokens"] for r in rounds) / wall, 1),
        "short_p50_s": round(statistics.median(short), 2),
        "short_p95_s": round(statistics.quantiles(short, n=20)[18], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model name or a checkpoint")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--long-every", type=int, default=6, help="every k-th request wants a long answer")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="per configuration, in ABBA order")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = resolve(args.model)
    work = workload(args.requests, args.long_every)
    engines = {
        name: TransformersEngine(model_dir, max_batch_size=args.max_batch_size, continuous_batching=continuous)
        for name, continuous in (("continuous", True), ("static", False))
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for engine in engines.values():
        asyncio.run(run(engine, work[1:4], 2))  # warm-up
    order = [("continuous", "static"), ("static", "continuous")] * ((args.rounds + 1) // 2)
    for pair in order[: args.rounds]:
        for name in pair:
            rounds[name].append(asyncio.run(run(engines[name], work, args.concurrency)))
            print(name, f"{rounds[name][-1]['wall']:.1f} s", flush=True)
    for engine in engines.values():
        asyncio.run(engine.close())
    results = {name: summarize(r) for name, r in rounds.items()}
    summary = {
        "model": args.model,
        "requests": args.requests,
        "long_every": args.long_every,
        "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        **results,
        "throughput_ratio": round(
            results["continuous"]["completion_tok_per_s"] / results["static"]["completion_tok_per_s"], 2
        ),
        "short_p50_ratio": round(results["static"]["short_p50_s"] / results["continuous"]["short_p50_s"], 2),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
