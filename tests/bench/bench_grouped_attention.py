"""Benchmark: the grouped decode-step attention against transformers' SDPA path (which copies K/V per query head).

Decoding cost grows with the context: BFCL's refine prompts are 2,500-5,000 tokens (the function list, the question,
the previous answer). Per context length, `--batch` requests that share nothing are sent at once to an engine with
each attention (both built in this one process, the same requests in the same order, prefix cache off so that each
one pays its prompt), each forced to a 40-number JSON array (~100 tokens). Reported per context: wall time,
completion tokens/s, the speed-up (stock wall time over grouped), and whether both produced the same texts.

    .venv/bin/python tests/bench/bench_grouped_attention.py --contexts 512,2048,4096 --batch 8 --out /tmp/ga.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from server.engine import SamplingParams  # noqa: E402
from server.engine.grouped_attention import NAME  # noqa: E402
from server.engine.transformers import TransformersEngine  # noqa: E402
from server.model_store import resolve  # noqa: E402

PARAMS = SamplingParams(max_tokens=120, json_schema={"type": "array", "items": {"type": "integer"}, "minItems": 40})
FILLER = "The service keeps a ledger of every order, refund and shipment for audit. "  # ~16 tokens


def prompts(context: int, batch: int) -> list[str]:
    repeats = max(1, context // 16)
    return [f"Note {i}. " + FILLER * repeats + f"List {40 + i} numbers as a JSON array." for i in range(batch)]


async def run(engine: TransformersEngine, texts: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.generate([{"role": "user", "content": t}], PARAMS) for t in texts))
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    return {
        "wall_s": round(wall, 2),
        "completion_tok_per_s": round(tokens / wall, 1),
        "prompt_tokens": results[0].prompt_tokens,
        "texts": [r.completions[0].text for r in results],
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--contexts", default="512,2048,4096", help="prompt lengths in tokens, about")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model_dir = resolve(args.model)
    engines = {
        name: TransformersEngine(
            model_dir, max_batch_size=args.batch, prefix_cache_tokens=0, attn_implementation=implementation
        )
        for name, implementation in (("stock_sdpa", "sdpa"), ("grouped", NAME))
    }
    for engine in engines.values():
        await engine.generate([{"role": "user", "content": "warm up"}], SamplingParams(max_tokens=4))
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": model_dir.name,
        "batch": args.batch,
        "contexts": [],
    }
    for context in (int(c) for c in args.contexts.split(",")):
        texts = prompts(context, args.batch)
        row: dict[str, Any] = {"context_tokens": None}
        for name, engine in engines.items():
            result = await run(engine, texts)
            row["context_tokens"] = result.pop("prompt_tokens")
            row[name] = result
        row["speedup"] = round(row["stock_sdpa"]["wall_s"] / row["grouped"]["wall_s"], 2)
        same = sum(a == b for a, b in zip(row["stock_sdpa"].pop("texts"), row["grouped"].pop("texts"), strict=True))
        row["same_texts"] = f"{same}/{args.batch}"
        report["contexts"].append(row)
        print(json.dumps(row), flush=True)
    for engine in engines.values():
        await engine.close()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
