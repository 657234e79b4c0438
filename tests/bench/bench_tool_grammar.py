"""Benchmark (issue 18): decoding speed under tool_choice "auto" with and without the lazy tool-call grammar.

The grammar's mask is computed for every token of every row, in free text as in calls. Two workloads, prompted as
the server prompts them (the pythonic format): `prose`, the first N BFCL simple_python questions' functions as tools
with a request for an explanation instead of a call (free text: the grammar only watches for a call to start), and
`calls`, N conversations with generated tools in which two earlier answers called the tool (the model calls it
again: the grammar constrains the call; the steering of tests/server/test_lazy_grammar.py). Each workload runs at
batch 1 and at batch 8, without and with the grammar, the two alternating request by request (batch by batch) for
`--repeats` rounds in one engine (prefix cache off), so that a busy machine slows both alike. Reported: completion
tokens per second of wall time (prefill included), the ratio, the time spent computing and applying masks per
constrained token and its share of the wall time, and the per-request cost of building the grammar (tool_grammar +
its compile check in serving) and its matcher (in the engine: compiled once per grammar, then copied).

    .venv/bin/python tests/bench/bench_tool_grammar.py --model smollm2-135m-instruct --limit 8 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import server.engine.transformers as transformers_engine  # noqa: E402
from server import toolcalls  # noqa: E402
from server.engine import SamplingParams  # noqa: E402
from server.engine.constrained import added_tokens, grammar_error  # noqa: E402
from server.engine.transformers import TransformersEngine  # noqa: E402
from server.model_store import resolve  # noqa: E402
from server.prompts import PromptFormat, build_prompt  # noqa: E402
from server.tool_grammar import tool_grammar  # noqa: E402
from tests.bench.bfcl_tools import load  # noqa: E402
from tests.server.test_lazy_grammar import generated_case  # noqa: E402

PROSE = "Do not call any function. Explain in detail, in several paragraphs, what each of these functions is for."


class MaskClock:
    """Time spent in the engine's mask_disallowed (compute the llguidance mask, apply it to the logits)."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._original = transformers_engine.mask_disallowed

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._original(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


async def run(engine: TransformersEngine, chunk: list[tuple[list[dict[str, Any]], SamplingParams]]):
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(messages, params) for messages, params in chunk))
    return time.perf_counter() - start, sum(r.completion_tokens for r in results), [r.text for r in results]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=8, help="requests per workload")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model_dir = resolve(args.model)
    engine = TransformersEngine(model_dir, max_batch_size=8, prefix_cache_tokens=0)
    clock = MaskClock()
    transformers_engine.mask_disallowed = clock  # the engine's module-level name: measured, not changed

    special = added_tokens(engine.tokenizer)
    rng = random.Random(18)
    steered = [generated_case(rng, i) for i in range(args.limit)]
    explained = [(q["tools"], [{"role": "user", "content": PROSE}]) for q in load("simple_python", args.limit)]
    workloads: dict[str, list[tuple[list[dict[str, Any]], str]]] = {"prose": [], "calls": []}
    build_times, matcher_times, copy_times = [], [], []
    for name, cases in (("prose", explained), ("calls", [([tool], messages) for tool, messages in steered])):
        for tools, messages in cases:
            start = time.perf_counter()
            grammar = tool_grammar(tools, special_tokens=special)
            assert grammar_error(grammar) == "", grammar_error(grammar)
            build_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine._constraints.grammar_matcher(grammar)
            matcher_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine._constraints.grammar_matcher(grammar)  # the next row, or refine round, with these tools
            copy_times.append(time.perf_counter() - start)
            prompt = build_prompt(messages, tools, PromptFormat.PYTHONIC)
            workloads[name].append((list(prompt.messages), grammar))
    await engine.generate([{"role": "user", "content": "warm up"}], SamplingParams(max_tokens=4))

    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": model_dir.name,
        "requests_per_workload": args.limit,
        "max_tokens": args.max_tokens,
        "grammar_build_ms": round(1000 * statistics.median(build_times), 1),
        "matcher_build_ms": round(1000 * statistics.median(matcher_times), 1),
        "matcher_copy_ms": round(1000 * statistics.median(copy_times), 3),
        "runs": [],
    }
    for name, items in workloads.items():
        for batch in (1, 8):
            totals = {"off": [0.0, 0], "on": [0.0, 0]}
            mask_seconds, mask_calls = 0.0, 0
            texts: dict[str, list[str]] = {"off": [], "on": []}
            for repeat in range(args.repeats):
                for i in range(0, len(items), batch):
                    for switch in ("off", "on"):
                        chunk = [
                            (
                                messages,
                                SamplingParams(max_tokens=args.max_tokens, grammar=g if switch == "on" else None),
                            )
                            for messages, g in items[i : i + batch]
                        ]
                        before = (clock.seconds, clock.calls)
                        wall, tokens, outputs = await run(engine, chunk)
                        totals[switch][0] += wall
                        totals[switch][1] += tokens
                        texts[switch] += outputs if repeat == 0 else []
                        if switch == "on":
                            mask_seconds += clock.seconds - before[0]
                            mask_calls += clock.calls - before[1]
            rates = {switch: tokens / wall for switch, (wall, tokens) in totals.items()}
            row = {
                "workload": name,
                "batch": batch,
                "off_tok_per_s": round(rates["off"], 1),
                "on_tok_per_s": round(rates["on"], 1),
                "on_over_off": round(rates["on"] / rates["off"], 3),
                "mask_ms_per_token": round(1000 * mask_seconds / mask_calls, 3) if mask_calls else None,
                "mask_share_of_on_wall": round(mask_seconds / totals["on"][0], 4),
                "same_texts": sum(a == b for a, b in zip(texts["off"], texts["on"], strict=True)),
                "calls_on": sum(bool(toolcalls.parse_answer(t).tool_calls) for t in texts["on"]),
                "sample_off": texts["off"][0][:100],
                "sample_on": texts["on"][0][:100],
            }
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    await engine.close()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
