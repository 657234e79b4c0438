"""Benchmark (issue 21): our server on the llama.cpp engine against llama.cpp's own server, same GGUF, same prompts.

Both run at once: ours (`serve --engine llamacpp`) and a plain `llama-server` with the engine's own settings
(`server_args`: slots, threads, KV pool, prompt lookup). Each round sends the same 16 story prompts, greedy,
`max_tokens` each, from 1 client and then from 8 at a time; llama.cpp's gets the token ids our tokenizer renders
(the ids our server sends its engine) through `/completion` with our engine's request body, so both decode identical
prompts (checked request by request: prompt token counts must match, else no ratio is reported). Rounds run in ABBA
order, so that background load weighs on both alike. Reported: completion tokens per second per server and stream
count, and their ratios (ours / llama.cpp; the goal is >= 0.95). With `--streamed-probe`, llama.cpp's server is also
asked with `"stream": true` and read event by event in Python, as our engine reads it: the share of the gap that
per-token wake-ups of a client process cost on a CPU whose every core runs a llama.cpp thread.

Then refinement on our server: the first N BFCL simple_python questions with tools, `refine=none` against
`refine=adaptive`, per question, the one going first alternating (llama.cpp's prompt cache has no salt, so the
second request of a pair finds the first one's prompt cached; alternating spreads that over both); for the requests
whose refinement converged (the second answer repeated the first), the median latency ratio adaptive / direct (the
goal is <= 1.3). Both requests of a pair see the same cache state: before each one, a one-token request with the
same prompt puts it in llama.cpp's prompt cache (without it, a direct request whose prompt was cached ran 1.1 s
against 2.96 s cold, SmolLM2, and the ratio mostly measured the cache). The ratio is then what a user with a warm
cache (an agent's growing conversation) pays for refinement: decoding the refine rounds.

    .venv/bin/python tests/bench/bench_llamacpp.py --model qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from server import model_store  # noqa: E402
from server.engine.base import SamplingParams, encode_chat  # noqa: E402
from server.engine.llamacpp import request_body, server_args  # noqa: E402
from server.engine.llamacpp_build import server_binary  # noqa: E402
from tests.bench.bfcl_tools import load  # noqa: E402
from tests.conftest import RunningServer, _free_port, start_server, stopped_after  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "a lost robot", "the first snow", "a dragon who cannot fly", "an old map",
    "a night train", "a chess match", "a garden on Mars", "a talking cat", "the last bookshop",
    "a storm at sea", "a clockmaker", "a desert city", "a broken violin", "a secret tunnel", "a winter festival",
]  # fmt: skip


@contextmanager
def llama_server(gguf: Path, log_dir: Path, max_model_len: int, slots: int) -> Iterator[RunningServer]:
    port = _free_port()
    log_path = log_dir / f"llama-server-{port}.log"
    cmd = [str(server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([*cmd, *server_args(max_model_len, slots)], stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", gguf.name, "", log_path)
    with stopped_after(proc, f"{server.base_url}/health", "llama-server", server.log, timeout=120):
        yield server


async def stories(server: RunningServer, kind: str, ids: list[list[int]], streams: int, max_tokens: int) -> dict:
    """One round: every story prompt once, `streams` at a time; tokens and wall time. `kind`: "ours", "llama.cpp"
    (one JSON answer per request) or "llama.cpp streamed" (server-sent events, read one by one)."""
    queue = list(range(len(TOPICS)))
    prompt_tokens = [0] * len(TOPICS)
    completion_tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal completion_tokens
        while queue:
            i = queue.pop(0)
            if kind == "ours":
                messages = [{"role": "user", "content": f"Write a long story about {TOPICS[i]}."}]
                body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
                response = await http.post(f"{server.v1}/chat/completions", json=body)
                response.raise_for_status()
                usage = response.json()["usage"]
                prompt_tokens[i], done = usage["prompt_tokens"], usage["completion_tokens"]
            else:
                body = request_body(ids[i], SamplingParams(max_tokens=max_tokens))
                if kind == "llama.cpp streamed":
                    async with http.stream("POST", f"{server.base_url}/completion", json={**body, "stream": True}) as r:
                        r.raise_for_status()
                        events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
                    data = events[-1]
                else:
                    response = await http.post(f"{server.base_url}/completion", json=body)
                    response.raise_for_status()
                    data = response.json()
                prompt_tokens[i] = data["tokens_evaluated"]
                done = data["tokens_predicted"] - (data["stop_type"] == "eos")  # ours does not count the end token
            completion_tokens += done

    async with httpx.AsyncClient(headers=server.headers if kind == "ours" else {}, timeout=1800) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(streams)))
        wall = time.perf_counter() - start
    return {"wall": wall, "completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens}


async def refine_pair(
    server: RunningServer, question: dict[str, Any], max_tokens: int, adaptive_first: bool
) -> dict[str, Any]:
    body = {"model": server.model, "messages": question["messages"], "tools": question["tools"]}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(headers=server.headers, timeout=600) as http:
        for mode in ("adaptive", "none") if adaptive_first else ("none", "adaptive"):
            warm = await http.post(f"{server.v1}/chat/completions", json={**body, "refine": "none", "max_tokens": 1})
            warm.raise_for_status()
            start = time.perf_counter()
            response = await http.post(f"{server.v1}/chat/completions", json={**body, "refine": mode})
            response.raise_for_status()
            out[mode] = time.perf_counter() - start
            if mode == "adaptive":
                out["refinement"] = response.json()["refinement"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=model_store.DEFAULT_MODEL, choices=list(model_store.EMBEDDED_MODELS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2, help="per server and stream count, in ABBA order")
    parser.add_argument("--refine-questions", type=int, default=20)
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8])
    parser.add_argument("--streamed-probe", action="store_true", help="also time llama-server streamed (1 stream)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here too")
    args = parser.parse_args()

    model_dir, gguf = model_store.prepare(args.model), model_store.gguf_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [
        encode_chat(tokenizer, [{"role": "user", "content": f"Write a long story about {t}."}], None) for t in TOPICS
    ]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    ours_args = ("--engine", "llamacpp", "--max-batch-size", str(args.slots))
    ours_args += ("--max-model-len", str(args.max_model_len))
    report: dict[str, Any] = {}
    with ExitStack() as stack:
        servers = {
            "ours": stack.enter_context(contextmanager(start_server)(args.model, log_dir, *ours_args)),
            "llama.cpp": stack.enter_context(llama_server(gguf, log_dir, args.max_model_len, args.slots)),
        }
        for streams in args.streams:
            kinds = ["ours", "llama.cpp"] + (["llama.cpp streamed"] if args.streamed_probe and streams == 1 else [])
            rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            order = [kinds, kinds[::-1]] * ((args.rounds + 1) // 2)
            for sequence in order[: args.rounds]:
                for name in sequence:
                    server = servers["ours" if name == "ours" else "llama.cpp"]
                    result = asyncio.run(stories(server, name, ids, streams, args.max_tokens))
                    rounds[name].append(result)
                    print(f"{streams} stream(s), {name}: {result['wall']:.1f} s", file=sys.stderr, flush=True)
            same_prompts = all(
                a["prompt_tokens"] == b["prompt_tokens"]
                for other in kinds[1:]
                for a, b in zip(rounds["ours"], rounds[other], strict=True)
            )
            speed = {
                name: round(sum(r["completion_tokens"] for r in rs) / sum(r["wall"] for r in rs), 2)
                for name, rs in rounds.items()
            }
            report[f"{streams}_streams"] = {
                "completion_tok_per_s": speed,
                "same_prompts": same_prompts,
                "ratio_ours_over_llamacpp": round(speed["ours"] / speed["llama.cpp"], 3) if same_prompts else None,
            }
            if "llama.cpp streamed" in speed and same_prompts:
                ratio = round(speed["llama.cpp streamed"] / speed["llama.cpp"], 3)
                report[f"{streams}_streams"]["ratio_llamacpp_streamed_over_unstreamed"] = ratio
        questions = load("simple_python", args.refine_questions)
        pairs = [
            asyncio.run(refine_pair(servers["ours"], q, args.max_tokens, i % 2 == 1)) for i, q in enumerate(questions)
        ]
    converged = [p for p in pairs if p["refinement"]["stop_reason"] == "converged"]
    report["refinement"] = {
        "questions": len(pairs),
        "converged": len(converged),
        "median_adaptive_over_direct": round(statistics.median(p["adaptive"] / p["none"] for p in converged), 3)
        if converged
        else None,
    }
    report["settings"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
