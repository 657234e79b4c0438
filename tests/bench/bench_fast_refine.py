"""Benchmark (issue 3): what refine=adaptive costs over refine=none, with and without the fast refine path.

Runs two real servers at once: one with the fast path (prefix reuse + draft verification, the default), one without
it (`--prefix-cache-tokens 0 --no-draft-refinement`). For each of the first N BFCL simple_python questions each
server gets refine=none then refine=adaptive, one request at a time, the servers taking turns in ABBA order (question
1 fast first, question 2 plain first, ...) so that background load drifting over the run weighs on both alike. Each
request has its own `cache_salt`, so no request reuses another's cached prompt (refine rounds within one still do).
Histories are compared on the `adaptive` requests only: `none` never takes the fast path.

    .venv/bin/python tests/bench/bench_fast_refine.py --model default --limit 30 --out /tmp/fast_refine.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bfcl_tools import load  # noqa: E402
from tests.conftest import RunningServer, start_server  # noqa: E402

CONFIGS = {"fast": (), "plain": ("--prefix-cache-tokens", "0", "--no-draft-refinement")}


def ask(http: httpx.Client, server: RunningServer, question: dict[str, Any], mode: str, max_tokens: int) -> dict:
    body = {
        "model": server.model,
        "messages": question["messages"],
        "tools": question["tools"],
        "max_tokens": max_tokens,
        "refine": mode,
        "return_refinement_history": True,
        "cache_salt": f"{question['id']}-{mode}-{time.time()}",
    }
    start = time.perf_counter()
    response = http.post(f"{server.v1}/chat/completions", json=body)
    latency = time.perf_counter() - start
    response.raise_for_status()
    data = response.json()
    return {
        "id": question["id"],
        "mode": mode,
        "latency": latency,
        "answer": data["refinement"]["answers"][-1],
        "final": data["choices"][0]["message"],
        "history": data["refinement"]["answers"],
        "iterations": data["refinement"]["iterations"],
        "stop_reason": data["refinement"]["stop_reason"],
        "usage": data["usage"],
    }


def run(model: str, questions: list[dict[str, Any]], max_tokens: int) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(contextmanager(start_server)(model, Path(tempfile.mkdtemp()), *extra))
            for name, extra in CONFIGS.items()
        }
        clients = {
            name: stack.enter_context(httpx.Client(headers=s.headers, timeout=900)) for name, s in servers.items()
        }
        for name, server in servers.items():
            ask(clients[name], server, questions[0], "none", max_tokens)  # warm-up
        for i, question in enumerate(questions):
            order = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                for mode in ("none", "adaptive"):
                    rows[name].append(ask(clients[name], servers[name], question, mode, max_tokens))
            print(f"  {i + 1}/{len(questions)}", file=sys.stderr, flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    none = {r["id"]: r for r in rows if r["mode"] == "none"}
    adaptive = {r["id"]: r for r in rows if r["mode"] == "adaptive"}
    first = [q for q, r in adaptive.items() if r["stop_reason"] == "converged" and r["iterations"] == 1]
    ratio = (
        statistics.median(adaptive[q]["latency"] for q in first) / statistics.median(none[q]["latency"] for q in first)
        if first
        else float("nan")
    )
    details = [r["usage"]["completion_tokens_details"] for r in adaptive.values()]
    return {
        "questions": len(adaptive),
        "converged_at_first_round": len(first),
        "ratio_median_adaptive_over_none_converged_at_1": ratio,
        "mean_refine_rounds": statistics.mean(r["iterations"] for r in adaptive.values()),
        "median_none_s": statistics.median(r["latency"] for r in none.values()),
        "median_adaptive_s": statistics.median(r["latency"] for r in adaptive.values()),
        "accepted_draft_tokens": sum(d["accepted_prediction_tokens"] for d in details),
        "rejected_draft_tokens": sum(d["rejected_prediction_tokens"] for d in details),
        "cached_prompt_tokens": sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in adaptive.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    questions = load("simple_python", args.limit)
    rows_by_config = run(args.model, questions, args.max_tokens)
    results: dict[str, Any] = {name: summarize(rows) for name, rows in rows_by_config.items()}
    fast, plain = ({r["id"]: r for r in rows_by_config[c] if r["mode"] == "adaptive"} for c in ("fast", "plain"))
    results["adaptive_requests_compared"] = len(fast)
    results["same_final_answers"] = sum(fast[k]["answer"] == plain[k]["answer"] for k in fast)
    results["same_histories"] = sum(fast[k]["history"] == plain[k]["history"] for k in fast)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": results, "rows": rows_by_config}, indent=2))


if __name__ == "__main__":
    main()
