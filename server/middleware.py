"""ASGI middleware around the API: request ids and the access log, body limits, curl-friendly JSON, metrics.

Plain ASGI classes rather than FastAPI dependencies, so that they see every request, failed ones included, and can
refuse a body before it is parsed.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from server.errors import APIError, BadRequest
from server.metrics import UNKNOWN_MODEL, Metrics, status_class

access_log = logging.getLogger("toolace.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BRACKETS_OR_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class PayloadTooLarge(APIError):
    status = 413


async def _send_error(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKETS_OR_STRINGS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


class BodyGuard:
    """Reads a POST body up to `max_bytes` (never more into memory), then refuses it when it is too large (413),
    not UTF-8 or nested deeper than `max_depth` (400), before any JSON parser or model sees it."""

    def __init__(self, app: Any, max_bytes: int, max_depth: int) -> None:
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.", code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            await _send_error(send, BadRequest("The request body is not UTF-8.", code="invalid_encoding"))
            return
        if json_depth(body) > self.max_depth:
            error = BadRequest(f"The request JSON nests deeper than {self.max_depth} levels.", code="too_deep")
            await _send_error(send, error)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the client's disconnect, as the app may

        await self.app(scope, replay, send)


class RequestLog:
    """Gives each request an id (the client's `X-Request-Id` when sane, else a new one), echoes it as
    `x-request-id`, and writes one JSON line per request: id, method, path, model, mode, rounds, status, latency.
    Prompts are never logged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] != "/health":  # probes would drown the log
                line = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round((time.perf_counter() - start) * 1000, 1),
                    **state.get("log", {}),
                }
                access_log.info(json.dumps(line))


class JSONBodyByDefault:
    """ASGI middleware: `curl -d` sends form encoding by default; read such POST bodies as the JSON they are."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [
                (k, v)
                for k, v in scope["headers"]
                if not (k == b"content-type" and v.startswith(b"application/x-www-form-urlencoded"))
            ]
            if not any(k == b"content-type" for k, _ in headers):
                headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: counts generation requests (chat completions and responses) by status class and keeps the
    in-flight gauge."""

    PATHS = ("/v1/chat/completions", "/v1/responses")

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_recording_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.in_flight.dec()
            model = scope.get("state", {}).get("model", UNKNOWN_MODEL)  # set by the route once the body parsed
            self.metrics.requests.labels(model, status_class(status)).inc()
