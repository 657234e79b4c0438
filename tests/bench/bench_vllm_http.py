"""Benchmark (issue 8): our server on the vLLM backend against vLLM's own OpenAI server, same model, same prompts.

Both servers run at once on the same engine settings (dtype, max_model_len, max_num_seqs = --concurrency, prefix
caching, LoRA slots as the vLLM backend's defaults). Each gets the first N BFCL simple_python questions, greedy,
`refine=none`, from `--concurrency` clients at a time:
- ours through the tool path: `tools` in the request, our system prompt, the answer parsed into tool calls;
- vLLM's with the very same prompt pre-rendered (our system prompt as a system message, no `tools`), so both
  engines see identical token ids: vLLM's server returns the ids it ran (`return_token_ids`), compared request by
  request with the ids our server's own rendering gives (`build_prompt` + `encode_chat`, and its `prompt_tokens`);
  the script reports no ratio when any differ.
Rounds run in ABBA order, so that drifting background load weighs on both alike. Reported: completion tokens per
second over each server's rounds, and their ratio (ours / vLLM; the goal is >= 0.95).

    .venv/bin/python tests/bench/bench_vllm_http.py --model smollm2-135m-instruct --limit 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from server import model_store  # noqa: E402
from server.engine.base import encode_chat  # noqa: E402
from server.engine.vllm import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS  # noqa: E402
from server.prompts import build_prompt, system_prompt  # noqa: E402
from tests.bench.bfcl_tools import load  # noqa: E402
from tests.conftest import API_KEY, REPO, RunningServer, _free_port, start_server, stopped_after  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@contextmanager
def vllm_server(model: str, model_dir: Path, log_dir: Path, args: argparse.Namespace) -> Iterator[RunningServer]:
    """`python -m vllm.entrypoints.openai.api_server` with the settings our vLLM backend uses."""
    port = _free_port()
    log_path = log_dir / f"vllm-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.concurrency),
        "--enable-prefix-caching",
        "--enable-lora",
        "--max-loras",
        str(DEFAULT_MAX_LORAS),
        "--max-lora-rank",
        str(DEFAULT_MAX_LORA_RANK),
        "--seed",
        "0",
        "--disable-log-stats",
    ]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ)
    server = RunningServer(f"http://127.0.0.1:{port}", model, API_KEY, log_path)
    with stopped_after(proc, f"{server.base_url}/health", "vLLM's server", server.log, timeout=600, stop_timeout=60):
        yield server


def bodies(questions: list[dict[str, Any]], model: str, max_tokens: int, ours: bool) -> list[dict[str, Any]]:
    out = []
    for q in questions:
        common = {"model": model, "max_tokens": max_tokens, "temperature": 0.0}
        if ours:
            out.append({**common, "messages": q["messages"], "tools": q["tools"], "refine": "none"})
        else:
            system = system_prompt([t["function"] for t in q["tools"]])
            messages = [{"role": "system", "content": system}, *q["messages"]]
            out.append({**common, "messages": messages, "return_token_ids": True})
    return out


def our_prompt_ids(questions: list[dict[str, Any]], model_dir: Path) -> list[list[int]]:
    """The prompt token ids our server gives each question: its own rendering, the functions it calls."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [build_prompt(q["messages"], q["tools"]) for q in questions]
    return [encode_chat(tokenizer, p.messages, p.tools) for p in prompts]


def prompt_mismatches(ours: list[list[int]], rounds: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Requests whose prompt differs between the two servers (ids from vLLM's, counts from ours)."""
    out = []
    for r, (mine, theirs) in enumerate(zip(rounds["ours"], rounds["vllm"], strict=True)):
        for i, (a, b, ids) in enumerate(zip(mine["results"], theirs["results"], ours, strict=True)):
            if a["prompt_tokens"] != len(ids) or b["prompt_token_ids"] != ids:
                out.append(f"round {r} question {i}")
    return out


async def run_round(
    server: RunningServer, requests: list[dict[str, Any]], concurrency: int, counts_eos: bool
) -> dict[str, Any]:
    """`counts_eos`: the server counts the end-of-turn token as a completion token (vLLM's does, ours does not)."""
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    results: list[dict[str, Any]] = [{} for _ in requests]

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, body = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(f"{server.v1}/chat/completions", json=body)
            response.raise_for_status()
            data = response.json()
            usage, finish = data["usage"], data["choices"][0]["finish_reason"]
            completion = usage["completion_tokens"]
            if counts_eos and finish == "stop":
                completion -= 1  # count alike: tokens of the answer only
            results[index] = {"latency": time.perf_counter() - start, "prompt_tokens": usage["prompt_tokens"]}
            results[index]["completion_tokens"] = completion
            results[index]["prompt_token_ids"] = data.get("prompt_token_ids")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=server.headers, timeout=1800, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall": wall, "results": results}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(r["wall"] for r in rounds)
    results = [x for r in rounds for x in r["results"]]
    completion = sum(x["completion_tokens"] for x in results)
    return {
        "requests": len(results),
        "wall_s": round(wall, 2),
        "completion_tokens": completion,
        "completion_tok_per_s": round(completion / wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "latency_p50_s": round(statistics.median(x["latency"] for x in results), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=list(model_store.EMBEDDED_MODELS))
    parser.add_argument("--limit", type=int, default=64, help="BFCL simple_python questions per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2, help="per server, in ABBA order")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here too")
    args = parser.parse_args()

    model_dir = model_store.prepare(args.model)
    questions = load("simple_python", args.limit)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    ours_args = ("--engine", "vllm", "--max-batch-size", str(args.concurrency), "--dtype", args.dtype)
    with ExitStack() as stack:
        ours_args += ("--max-model-len", str(args.max_model_len))
        servers = {
            "ours": stack.enter_context(contextmanager(start_server)(args.model, log_dir, *ours_args)),
            "vllm": stack.enter_context(vllm_server(args.model, model_dir, log_dir, args)),
        }
        requests = {name: bodies(questions, args.model, args.max_tokens, name == "ours") for name in servers}
        for name, server in servers.items():
            warm = asyncio.run(run_round(server, requests[name][: args.concurrency], args.concurrency, name == "vllm"))
            print(f"warm-up {name}: {warm['wall']:.1f} s", file=sys.stderr, flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "vllm": []}
        order = [("ours", "vllm"), ("vllm", "ours")] * ((args.rounds + 1) // 2)
        for pair in order[: args.rounds]:
            for name in pair:
                result = asyncio.run(run_round(servers[name], requests[name], args.concurrency, name == "vllm"))
                rounds[name].append(result)
                print(f"{name}: {result['wall']:.1f} s", file=sys.stderr, flush=True)
    mismatched = prompt_mismatches(our_prompt_ids(questions, model_dir), rounds)
    if mismatched:
        print(f"no ratio: the servers ran different prompts ({len(mismatched)}): {mismatched[:5]}", file=sys.stderr)
        return 1
    report: dict[str, Any] = {name: summarize(r) for name, r in rounds.items()}
    report["prompts_compared"] = f"{len(questions)} x {args.rounds} rounds, token ids identical"
    report["ratio_ours_over_vllm"] = round(
        report["ours"]["completion_tok_per_s"] / report["vllm"]["completion_tok_per_s"], 3
    )
    report["settings"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
