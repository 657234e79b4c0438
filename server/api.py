"""The HTTP application: middleware, errors in OpenAI's shape, and the routes of routes.py over one ChatService."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__, routes
from server.errors import APIError, error_body
from server.middleware import BodyGuard, JSONBodyByDefault, RequestLog, RequestMetrics
from server.serving import ChatService

log = logging.getLogger(__name__)


def create_app(
    service: ChatService,
    *,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    metrics_public: bool = False,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.engine.close()

    app = FastAPI(title="ToolACE-R server", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None)
    app.state.service = service
    app.state.api_key, app.state.admin_api_key, app.state.metrics_public = api_key, admin_api_key, metrics_public
    limits = service.config.limits
    # The last added runs first: the log sees everything, the body guard runs before any parsing.
    app.add_middleware(JSONBodyByDefault)
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_middleware(RequestLog)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)
    app.include_router(routes.router)
    return app


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return JSONResponse(
            error_body("The request body is not valid JSON.", "invalid_request_error", code="invalid_json"),
            status_code=400,
        )
    param = _param_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request body"
    return JSONResponse(
        error_body(f"Invalid value for {where}: {message}", "invalid_request_error", param=param),
        status_code=400,
    )


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("The server had an error processing the request.", "server_error"), status_code=500)


def _param_path(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [p for p in loc if p not in ("body", "query")]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-after[", "function-before[", "literal[")):
            path += f".{part}" if path else str(part)
    return path or None
