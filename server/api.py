"""HTTP only: routes, auth, validation errors in OpenAI's shape. The logic lives in serving.ChatService."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapters import AdapterError
from server.errors import APIError, NotFound, Unauthorized, error_body
from server.metrics import CONTENT_TYPE, UNKNOWN_MODEL, Metrics, status_class
from server.protocol import ChatCompletionRequest, LoadLoraAdapter, UnloadLoraAdapter
from server.refine import RefineMode
from server.serving import ChatService
from server.streaming import sse

log = logging.getLogger(__name__)


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


def _bearer_matches(request: Request, key: str) -> bool:
    supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return secrets.compare_digest(supplied.encode(), key.encode())


def _validation_error(exc: RequestValidationError) -> JSONResponse:
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
    """ASGI middleware: counts chat completions by status class and keeps the in-flight gauge."""

    PATH = "/v1/chat/completions"

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH:
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

    app = FastAPI(title="ToolACE-R server", version="0.1.0", lifespan=lifespan)
    app.add_middleware(JSONBodyByDefault)
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    async def authorize(request: Request) -> None:
        if api_key is not None and not _bearer_matches(request, api_key):
            raise Unauthorized("Invalid API key.", code="invalid_api_key")

    async def authorize_admin(request: Request) -> None:
        if admin_api_key is None or service.adapters is None:
            raise NotFound("Adapter management is off; start the server with --admin-api-key to turn it on.")
        if not _bearer_matches(request, admin_api_key):
            raise Unauthorized("Invalid admin API key.", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("The server had an error processing the request.", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return service.models().model_dump(mode="json")

    @app.get("/metrics", dependencies=[] if metrics_public else [Depends(authorize)])
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(
        request: Request,
        body: ChatCompletionRequest,
        refine: RefineMode | None = Query(default=None, description="refinement mode, when the body has none"),
    ) -> Response:
        request.state.model = service.model_label(body.model)
        if body.stream:
            plan = service.plan(body, refine)  # validation errors are still plain 4xx responses
            return StreamingResponse(sse(service.stream(plan)), media_type="text/event-stream")
        response = await service.complete(body, refine)
        return JSONResponse(response.to_json())

    # vLLM's request shapes, so tooling written for `vllm serve` manages adapters here too.
    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def load_lora_adapter(body: LoadLoraAdapter) -> dict[str, Any]:
        assert service.adapters is not None  # authorize_admin checked
        try:
            info = await service.adapters.add(body.lora_name, body.lora_path)
        except AdapterError as exc:
            raise exc.api_error() from exc
        return {"object": "lora_adapter", "id": info.name, "rank": info.rank, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def unload_lora_adapter(body: UnloadLoraAdapter) -> dict[str, Any]:
        assert service.adapters is not None
        try:
            await service.adapters.remove(body.lora_name)
        except AdapterError as exc:
            raise exc.api_error() from exc
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    return app
