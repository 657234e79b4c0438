"""Limits, backpressure, deadlines, disconnects, request ids and graceful shutdown, against a real server.

The module's server is small on purpose: one running slot, one waiting slot, an 8 s deadline and a 1 MiB body cap,
so that every refusal path can be reached with a handful of requests to SmolLM2.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMOL, RunningServer, assert_error, start_server

SHORT = [{"role": "user", "content": "Say hi."}]
# SmolLM2 keeps counting for as long as it is allowed to: a request that takes as long as max_tokens says.
LONG = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
# Sampled, so every round decodes in full (greedy rounds verify the previous answer in one pass and are quick).
SLOW_REFINEMENT = {
    "model": SMOL,
    "messages": LONG,
    "refine": "vanilla",
    "max_refine_iterations": 10,
    "temperature": 0.7,
    "seed": 1,
}


@pytest.fixture(scope="module")
def server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(
        SMOL,
        tmp_path_factory.mktemp("reliability"),
        "--max-active-requests",
        "1",
        "--max-queued-requests",
        "1",
        "--request-timeout",
        "8",
        "--max-body-bytes",
        str(1024 * 1024),
        "--max-tools",
        "4",
        "--max-tokens",
        "2048",
    )


def rss_kib(server: RunningServer) -> int:
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as f:
        status = f.read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def counter(server: RunningServer, family: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers, timeout=10).text
    return sum(
        sample.value
        for fam in text_string_to_metric_families(text)
        if fam.name == family
        for sample in fam.samples
        if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def short_request_is_quick(server: RunningServer) -> float:
    started = time.monotonic()
    response = server.post("chat/completions", {"model": SMOL, "messages": SHORT, "max_tokens": 4})
    assert response.status_code == 200, response.text
    return time.monotonic() - started


# ---- limits ----


def test_huge_bodies_are_refused_without_reading_them(server: RunningServer) -> None:
    before = rss_kib(server)
    huge = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    assert_error(
        server.post("chat/completions", huge, headers={"content-type": "application/json"}), 413, code="body_too_large"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    assert_error(
        server.post("chat/completions", chunks(), headers={"content-type": "application/json"}),
        413,
        code="body_too_large",
    )  # type: ignore[arg-type]
    assert rss_kib(server) - before < 20 * 1024  # never buffered the 10 MB (let alone a parsed copy)


def test_deep_nesting_and_bad_encoding_are_refused(server: RunningServer) -> None:
    before = rss_kib(server)
    deep = b'{"model": "x", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    assert_error(server.post("chat/completions", deep), 400, code="too_deep")
    assert_error(
        server.post("chat/completions", b'{"model": "\xff\xfe", "messages": []}'), 400, code="invalid_encoding"
    )
    assert rss_kib(server) - before < 20 * 1024
    assert short_request_is_quick(server) < 60  # still serving


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 4096}, "max_tokens"),
        ({"max_completion_tokens": 4096}, "max_completion_tokens"),
        ({"n": 9}, "n"),
        ({"max_refine_iterations": 11}, "max_refine_iterations"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(5)]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "big",
                            "parameters": {
                                "type": "object",
                                "properties": {
                                    f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)
                                },
                            },
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        # a parameters schema that is not a JSON Schema object
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_request_limits_name_the_field(server: RunningServer, extra: dict[str, Any], param: str) -> None:
    response = server.post("chat/completions", {"model": SMOL, "messages": SHORT, **extra})
    assert_error(response, 400, param=param)


# ---- backpressure, deadlines, disconnects ----


def test_a_full_queue_answers_429_with_retry_after(server: RunningServer) -> None:
    # The running request streams until the client leaves, so the waiting one's 8 s deadline only starts to count
    # down once the 429 is in: nothing here depends on how fast this machine decodes.
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as client:
            url = f"{server.v1}/chat/completions"
            long_body = {"model": SMOL, "messages": LONG, "max_tokens": 1000, "stream": True}
            async with client.stream("POST", url, json=long_body) as first:
                lines = first.aiter_lines()  # held: a dropped iterator would close the stream
                await anext(lines)  # running
                short_body = {"model": SMOL, "messages": SHORT, "max_tokens": 4}
                second = asyncio.create_task(client.post(url, json=short_body))
                await asyncio.sleep(0.5)  # waiting
                third = await client.post(url, json=short_body)
                assert not second.done()
            return [first, await second, third]

    first, second, third = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert_error(third, 429, code="server_busy")
    assert third.headers["retry-after"] == "1"
    assert counter(server, "toolace_requests_rejected", model=SMOL) >= 1


def test_the_deadline_gives_504_and_frees_the_engine(server: RunningServer) -> None:
    started = time.monotonic()
    # 11 sampled rounds (no fast path) of about 120 tokens: far beyond the 8 s deadline
    body = {**SLOW_REFINEMENT, "max_tokens": 400}
    assert_error(server.post("chat/completions", body), 504, code="request_timeout")
    assert 7 < time.monotonic() - started < 30
    assert short_request_is_quick(server) < 30  # the ~70 s of rounds left did not go on ahead of it
    assert counter(server, "toolace_requests_cancelled", reason="timeout") >= 1


def test_a_client_that_goes_away_stops_its_refinement(server: RunningServer) -> None:
    before = counter(server, "toolace_requests_cancelled", reason="client_disconnect")
    timeouts = counter(server, "toolace_requests_cancelled", reason="timeout")
    body = {**SLOW_REFINEMENT, "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):
        server.post("chat/completions", body, timeout=2.0)  # ~2 s in: round 0 of 11 rounds of up to 400 tokens
    deadline = time.monotonic() + 60  # a wait for the event, which comes within a second when all is well
    while counter(server, "toolace_requests_cancelled", reason="client_disconnect") == before:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.2)
    assert short_request_is_quick(server) < 30  # the ~70 s of rounds left are not running ahead of it
    # The 8 s deadline would cut a generation left running after the hang-up before the quick request got the one
    # slot, so the quick request alone cannot tell; such a generation ends as a timeout, counted by then.
    assert counter(server, "toolace_requests_cancelled", reason="timeout") == timeouts


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(server: RunningServer) -> None:
    started = time.monotonic()
    response = server.post("chat/completions", {**SLOW_REFINEMENT, "max_tokens": 400, "stream": True})
    assert response.status_code == 200  # admitted at once; the deadline passes while it streams
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout", events[-3:]
    assert 7 < time.monotonic() - started < 30
    assert short_request_is_quick(server) < 30  # the ~70 s of rounds left did not go on ahead of it


def test_a_stream_whose_client_goes_away_stops(server: RunningServer) -> None:
    before = counter(server, "toolace_requests_cancelled", reason="client_disconnect")
    timeouts = counter(server, "toolace_requests_cancelled", reason="timeout")
    body = {**SLOW_REFINEMENT, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the role chunk: the request is running; then hang up
    deadline = time.monotonic() + 60  # a wait for the event, which comes within a second when all is well
    while counter(server, "toolace_requests_cancelled", reason="client_disconnect") == before:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.2)
    assert short_request_is_quick(server) < 30  # the ~70 s of rounds left are not running ahead of it
    # The 8 s deadline would cut a generation left running after the hang-up before the quick request got the one
    # slot, so the quick request alone cannot tell; such a generation ends as a timeout, counted by then.
    assert counter(server, "toolace_requests_cancelled", reason="timeout") == timeouts


# ---- request ids and the access log ----


def test_request_ids_and_one_log_line_per_request(server: RunningServer) -> None:
    response = server.post(
        "chat/completions", {"model": SMOL, "messages": SHORT, "max_tokens": 4}, headers={"X-Request-Id": "abc-123"}
    )
    assert response.headers["x-request-id"] == "abc-123"
    fresh = server.post(
        "chat/completions", {"model": SMOL, "messages": SHORT, "max_tokens": 4}, headers={"X-Request-Id": "bad id!"}
    )
    assert fresh.headers["x-request-id"] != "bad id!" and len(fresh.headers["x-request-id"]) == 32
    time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if "toolace.access" in line and '"abc-123"' in line]
    assert len(lines) == 1
    record = json.loads(lines[0].split("toolace.access: ", 1)[1])
    assert record["status"] == 200 and record["model"] == SMOL and record["mode"] == "none"
    assert record["rounds"] == 0 and record["latency_ms"] > 0
    assert "Say hi" not in server.log()  # prompts stay out of the log


# ---- auth on every route ----


def test_every_route_but_health_needs_the_key(server: RunningServer) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=10)
            assert_error(response, 401)
            assert response.json()["error"]["message"] == "Invalid API key."  # no detail about what was wrong
    assert httpx.get(f"{server.base_url}/openapi.json", headers=server.headers).json()["paths"]


# ---- graceful shutdown ----


def test_sigterm_finishes_in_flight_requests_then_exits_0(smol_dir: Any, tmp_path: Any) -> None:
    for server in start_server(SMOL, tmp_path):
        assert server.process is not None

        async def scenario(server: RunningServer = server) -> httpx.Response:
            async with httpx.AsyncClient(headers=server.headers, timeout=120) as client:
                body = {"model": SMOL, "messages": LONG, "max_tokens": 60}
                request = asyncio.create_task(client.post(f"{server.v1}/chat/completions", json=body))
                await asyncio.sleep(1.0)
                server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                return await request

        response = asyncio.run(scenario())
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 10
        assert server.process.wait(timeout=60) == 0
