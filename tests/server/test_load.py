"""Concurrent clients against the real server: every request is answered, as a 200 or a 429 with Retry-After, and
none hangs. A smaller run of tests/bench/bench_load.py (same request mix, same client code)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.bench.bench_load import Outcome, request_bodies, run_load, summarize
from tests.conftest import SMOL, RunningServer, start_server

CLIENTS = 64
REQUESTS = 128
TIMEOUT = 300.0  # per request: far beyond what any of these takes, short of pytest's 600 s


@pytest.fixture(scope="module")
def server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(SMOL, tmp_path_factory.mktemp("load"))  # default limits: 32 running, 256 waiting


@pytest.fixture(scope="module")
def small_server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Room for 4 requests in all, so 64 clients get refused most of the time.
    yield from start_server(
        SMOL, tmp_path_factory.mktemp("load-small"), "--max-active-requests", "2", "--max-queued-requests", "2"
    )


def load(server: RunningServer, bodies: list[dict[str, Any]]) -> tuple[list[Outcome], dict[str, Any]]:
    outcomes, wall = asyncio.run(run_load(server, bodies, CLIENTS, TIMEOUT))
    summary = summarize(outcomes, len(bodies), wall, CLIENTS)
    print(summary)
    return outcomes, summary


def assert_all_answered(server: RunningServer, outcomes: list[Outcome], total: int) -> None:
    assert len(outcomes) == total and sorted(o.index for o in outcomes) == list(range(total))  # none lost
    bad = [o for o in outcomes if not o.ok]
    assert not bad, bad[:5]  # no 5xx, no timeout (hung), no dropped connection, no 429 without Retry-After
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
    assert "Traceback" not in server.log(), server.log()[-6000:]


def test_every_request_is_answered(server: RunningServer) -> None:
    bodies = request_bodies(server.model, REQUESTS, max_tokens=8, max_refine_iterations=2)
    outcomes, summary = load(server, bodies)
    assert_all_answered(server, outcomes, REQUESTS)
    assert summary["by_status"].get("200", 0) > 0


def test_refusals_at_capacity_are_429_with_retry_after(small_server: RunningServer) -> None:
    bodies = [{**b, "stream": False} for b in request_bodies(small_server.model, REQUESTS, 8, 2)]
    outcomes, summary = load(small_server, bodies)
    assert_all_answered(small_server, outcomes, REQUESTS)
    assert summary["by_status"].get("200", 0) >= 4 and summary["by_status"].get("429", 0) > 0, summary


def test_streamed_refusals_at_capacity_are_429_with_retry_after(small_server: RunningServer) -> None:
    bodies = [{**b, "stream": True} for b in request_bodies(small_server.model, 32, 8, 2)]
    outcomes, summary = load(small_server, bodies)
    assert_all_answered(small_server, outcomes, 32)
    assert summary["by_status"].get("200", 0) >= 4 and summary["by_status"].get("429", 0) > 0, summary
