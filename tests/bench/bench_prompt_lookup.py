"""Benchmark (issue 21): the llama.cpp engine's prompt lookup on a sampled load, as training's selection sends it.

Selection samples `n` answers at temperature 1 for several prompts at once. Prompt lookup (llama.cpp's n-gram
drafts) pays where an answer repeats its prompt (refine rounds); here every rejected draft is a batch of tokens per
sequence. The engine is started twice, with lookup and without, ABBA, each time with the same prompts (BFCL
live_multiple questions from the training side in the native format) and the same seeds; reported per run: seconds,
completion tokens, draft tokens offered and accepted.

    .venv/bin/python tests/bench/bench_prompt_lookup.py \
        --adapter runs/qwen2.5-coder-0.5b-toolace-r-native/iter_2/adapter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from server import model_store  # noqa: E402
from server.engine import create_engine  # noqa: E402
from server.engine.base import Generation, SamplingParams  # noqa: E402
from server.prompts import Prompt, PromptFormat  # noqa: E402
from training.data import load_source  # noqa: E402


async def one_run(args: argparse.Namespace, prompts: list[Prompt], prompt_lookup: bool) -> dict[str, Any]:
    base = model_store.resolve(args.model)
    engine = create_engine(
        "llamacpp", str(base), gguf=model_store.gguf_path(args.model), max_batch_size=16, prompt_lookup=prompt_lookup
    )
    try:
        adapter = None
        if args.adapter:
            adapter = "adapter"
            await engine.load_adapter(adapter, args.adapter)

        async def sample(i: int, prompt: Prompt) -> Generation:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, seed=i, n=args.n)
            return await engine.generate(engine.encode_chat(prompt.messages, prompt.tools), params, adapter=adapter)

        started = time.monotonic()
        generations = await asyncio.gather(*(sample(i, p) for i, p in enumerate(prompts)))
        seconds = time.monotonic() - started
    finally:
        await engine.close()
    return {
        "prompt_lookup": prompt_lookup,
        "seconds": round(seconds, 1),
        "prompt_tokens": sum(g.prompt_tokens for g in generations),
        "completion_tokens": sum(c.completion_tokens for g in generations for c in g.completions),
        "draft_tokens": sum(g.draft_tokens for g in generations),
        "draft_accepted_tokens": sum(g.draft_accepted_tokens for g in generations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapter", type=Path, default=None, help="a peft LoRA directory to sample with")
    parser.add_argument("--prompts", type=int, default=4, help="prompts sent at once (selection's concurrency)")
    parser.add_argument("--skip", type=int, default=8, help="live_multiple questions skipped before them")
    parser.add_argument("--n", type=int, default=4, help="answers per prompt (selection's k)")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    samples = load_source({"type": "bfcl", "category": "live_multiple", "limit": args.skip + args.prompts})
    prompts = [s.prompt(PromptFormat.NATIVE) for s in samples[args.skip :]]
    runs = [asyncio.run(one_run(args, prompts, lookup)) for lookup in (True, False, False, True)]  # ABBA
    for run in runs:
        print(json.dumps(run))
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
