"""Load test (issue 7): many concurrent clients against the real server; every request must be answered.

64 clients (one connection each) share a list of requests that mixes refine modes (none, adaptive, vanilla),
streaming and non-streaming, with and without tools, all with a short max_tokens. Each request must end as a 200
(a streamed one: its events end with [DONE] and carry no error) or as a 429 with Retry-After, within a per-request
timeout. Anything else (a 5xx, a timeout, a dropped connection, an error event inside a 200 stream) is a failure:
the script prints a JSON summary and exits 1.

    .venv/bin/python tests/bench/bench_load.py --requests 500 --concurrency 64 --max-tokens 16

Extra server flags go after `--`, e.g. `-- --max-active-requests 8 --max-queued-requests 16` to see 429s.
tests/server/test_load.py runs a smaller version of this in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import SMOL, RunningServer, start_server  # noqa: E402

MODES = ("none", "adaptive", "vanilla")
PROMPTS = (
    "Say hi.",
    "Name three colors.",
    "What is 2 + 2?",
    "Write one short sentence about the sea.",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Outcome:
    index: int
    mode: str
    stream: bool
    status: str  # "200", "429", another HTTP status, "timeout", "stream_error:<type>" or "error:<exception>"
    latency: float  # seconds from sending to the last byte (or to the failure)
    first_byte: float | None  # seconds to the first streamed event
    retry_after: str | None

    @property
    def ok(self) -> bool:
        return self.status == "200" or (self.status == "429" and bool(self.retry_after))


def request_bodies(model: str, total: int, max_tokens: int, max_refine_iterations: int) -> list[dict[str, Any]]:
    """A fixed, evenly mixed list: every (mode, stream) pair in turn; every third request offers a tool."""
    bodies = []
    for i in range(total):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "refine": MODES[i % len(MODES)],
            "stream": (i // len(MODES)) % 2 == 1,
            "max_tokens": max_tokens,
            "max_refine_iterations": max_refine_iterations,
        }
        if i % 3 == 2:
            body["messages"] = [{"role": "user", "content": "What is the weather in Paris?"}]
            body["tools"] = [WEATHER]
        bodies.append(body)
    return bodies


async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[str, float | None, str | None]:
    """(status, seconds to first streamed event, Retry-After) of one request, read to its end."""
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        retry_after = response.headers.get("retry-after")
        if response.status_code != 200 or not body.get("stream"):
            await response.aread()
            if response.status_code == 200 and not json.loads(response.content).get("choices"):
                return "bad_body", None, retry_after
            return str(response.status_code), None, retry_after
        first_byte, events = None, []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                first_byte = first_byte or time.perf_counter() - started
                events.append(line.removeprefix("data: "))
    if not events or events[-1] != "[DONE]":
        return "stream_error:no_done", first_byte, retry_after
    for event in events[:-1]:
        error = json.loads(event).get("error")
        if error:  # a refusal or failure after the 200 went out: the status line cannot say it any more
            return f"stream_error:{error.get('type')}", first_byte, retry_after
    return "200", first_byte, retry_after


async def run_load(
    server: RunningServer,
    bodies: list[dict[str, Any]],
    concurrency: int,
    timeout: float,
) -> tuple[list[Outcome], float]:
    """Send `bodies` from `concurrency` clients; returns one outcome per body and the wall time."""
    url = f"{server.v1}/chat/completions"
    pending = iter(enumerate(bodies))  # shared: each client takes the next request when it is free
    outcomes: list[Outcome] = []

    async def client_loop() -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(headers=server.headers, timeout=timeout, limits=limits) as client:
            for index, body in pending:
                started = time.perf_counter()
                try:
                    # The hang guard: httpx's timeout is per read, this one is for the whole request.
                    status, first_byte, retry_after = await asyncio.wait_for(_send(client, url, body), timeout)
                except TimeoutError:
                    status, first_byte, retry_after = "timeout", None, None
                except Exception as exc:  # every other way a request can be lost is an outcome too
                    status, first_byte, retry_after = f"error:{type(exc).__name__}", None, None
                latency = time.perf_counter() - started
                outcomes.append(
                    Outcome(index, body["refine"], body["stream"], status, latency, first_byte, retry_after)
                )

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def summarize(outcomes: list[Outcome], total: int, wall: float, concurrency: int) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for outcome in outcomes:
        by_status[outcome.status] = by_status.get(outcome.status, 0) + 1
    answered = [o.latency for o in outcomes if o.status == "200"]
    first_bytes = [o.first_byte for o in outcomes if o.status == "200" and o.first_byte is not None]
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        kind = f"{o.mode}/{'stream' if o.stream else 'json'}"
        by_kind.setdefault(kind, {})
        by_kind[kind][o.status] = by_kind[kind].get(o.status, 0) + 1
    return {
        "requests": total,
        "concurrency": concurrency,
        "answered": len(outcomes),
        "lost": total - len(outcomes),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "not_ok": sum(not o.ok for o in outcomes) + total - len(outcomes),
        "429_without_retry_after": sum(o.status == "429" and not o.retry_after for o in outcomes),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(outcomes) / wall, 2) if wall else None,
        "completed_rps": round(len(answered) / wall, 2) if wall else None,
        "latency_200_s": {"p50": _percentile(answered, 50), "p95": _percentile(answered, 95), "max": _max(answered)},
        "first_event_stream_s": {"p50": _percentile(first_bytes, 50), "p95": _percentile(first_bytes, 95)},
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()} (CPU inference)",
    }


def _max(values: list[float]) -> float | None:
    return round(max(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOL)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-refine-iterations", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take before it is hung")
    parser.add_argument("--out", type=Path, default=None, help="also write the summary and every outcome here")
    parser.add_argument("server_args", nargs="*", help="extra `toolace-r serve` flags, after --")
    args = parser.parse_args()

    failed = True
    for server in start_server(args.model, Path(tempfile.mkdtemp()), *args.server_args):
        bodies = request_bodies(server.model, args.requests, args.max_tokens, args.max_refine_iterations)
        outcomes, wall = asyncio.run(run_load(server, bodies, args.concurrency, args.timeout))
        summary = summarize(outcomes, args.requests, wall, args.concurrency)
        summary["server_args"] = args.server_args
        summary["server_tracebacks"] = server.log().count("Traceback")
        print(json.dumps(summary, indent=2))
        if args.out:
            rows = [o.__dict__ for o in outcomes]
            args.out.write_text(json.dumps({"summary": summary, "outcomes": rows}, indent=2))
        failed = bool(summary["not_ok"] or summary["server_tracebacks"])
    sys.exit(1 if failed else 0)  # after the loop: start_server has stopped the server


if __name__ == "__main__":
    main()
