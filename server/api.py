"""HTTP only: routes, auth, validation errors in OpenAI's shape. The logic lives in serving.ChatService; the
Responses API is a translation over it (responses.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__, responses
from server.adapters import AdapterError
from server.errors import APIError, NotFound, Unauthorized, error_body
from server.metrics import CONTENT_TYPE
from server.middleware import BodyGuard, JSONBodyByDefault, RequestLog, RequestMetrics
from server.protocol import ChatCompletionRequest, ChatCompletionResponse, LoadLoraAdapter, UnloadLoraAdapter
from server.refine import RefineMode
from server.serving import ChatService, Plan
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


async def _finished_before_disconnect(request: Request, work: asyncio.Future[Any]) -> bool:
    """Wait for `work`; if the client disconnects first, cancel it (the engine aborts the generation and no
    further refine round starts) and return False."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return not work.cancelled()


_END = object()  # the end of a stream, in the queue between its producer and the response

# The SSE bytes of an endpoint's stream, made from the chat completion chunks (streaming.sse, responses.sse).
Framer = Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]]


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

    # The schema is served behind the API key like everything but /health (no docs UI: nothing to click here).
    app = FastAPI(title="ToolACE-R server", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None)
    limits = service.config.limits
    # The last added runs first: the log sees everything, the body guard runs before any parsing.
    app.add_middleware(JSONBodyByDefault)
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes, max_depth=limits.max_json_depth)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_middleware(RequestLog)

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
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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

    @app.get("/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

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
        plan = service.plan(body, refine)  # every check that can fail, before any work and before a stream starts
        request.state.log = plan.log
        return await answered(request, plan, ChatCompletionResponse.to_json, sse)

    @app.post("/v1/responses", dependencies=[Depends(authorize)])
    async def create_response(
        request: Request,
        body: responses.ResponsesRequest,
        refine: RefineMode | None = Query(default=None, description="refinement mode, when the body has none"),
    ) -> Response:
        """OpenAI's Responses API, stateless, on the chat completions path (server/responses.py translates)."""
        chat = responses.to_chat_request(body)
        request.state.model = service.model_label(chat.model)
        try:
            plan = service.plan(chat, refine)
        except APIError as exc:  # name the Responses field, not the chat field it became
            exc.param = responses.responses_param(exc.param)
            raise
        request.state.log = plan.log
        return await answered(
            request,
            plan,
            lambda completion: responses.from_chat(body, plan.params, completion),
            lambda chunks: responses.sse(body, plan.params, plan.model, chunks),
        )

    async def answered(
        request: Request,
        plan: Plan,
        to_json: Callable[[ChatCompletionResponse], dict[str, Any]],
        frame: Framer,
    ) -> Response:
        """Run a planned request: the whole answer as JSON (`to_json`), or streamed as the events `frame` makes
        of the chat completion chunks."""
        if plan.request.stream:
            return await streamed(request, plan, frame)
        work = asyncio.ensure_future(service.complete(plan))
        if not await _finished_before_disconnect(request, work):
            return client_went_away(request, plan)
        return JSONResponse(to_json(work.result()))

    async def streamed(request: Request, plan: Plan, frame: Framer) -> Response:
        """The stream's chunks are produced in a task of their own, which holds the request's slot and deadline for
        its whole life (an asyncio deadline belongs to one task). Admission (429 when too many wait, 504 past the
        deadline) comes before the first chunk: waiting for that here makes a refusal a plain HTTP error, not an
        event inside a 200 stream. After that, errors are events (`frame` turns the chunks, and an error among them,
        into the endpoint's SSE bytes); a client that goes away cancels the task."""
        chunks: asyncio.Queue[Any] = asyncio.Queue()

        async def produce() -> None:
            try:
                async for chunk in service.stream(plan):
                    chunks.put_nowait(chunk)
            except Exception as exc:  # handed to the reader, which raises it where the response is being sent
                chunks.put_nowait(exc)
            else:
                chunks.put_nowait(_END)

        producer = asyncio.ensure_future(produce())
        first = asyncio.ensure_future(chunks.get())
        if not await _finished_before_disconnect(request, first):
            producer.cancel()
            return client_went_away(request, plan)
        if isinstance(first.result(), Exception):
            raise first.result()

        async def relay() -> AsyncIterator[Any]:
            item = first.result()
            try:
                while item is not _END:
                    if isinstance(item, Exception):
                        raise item
                    yield item
                    item = await chunks.get()
            finally:
                if not producer.done():  # Starlette stopped reading: the client went away
                    producer.cancel()
                    client_went_away(request, plan)

        return StreamingResponse(frame(relay()), media_type="text/event-stream")

    def client_went_away(request: Request, plan: Plan) -> Response:
        service.metrics.cancelled.labels(request.state.model, "client_disconnect").inc()
        plan.log["cancelled"] = "client_disconnect"
        log.info("client went away: request %s cancelled", request.state.request_id)
        return Response(status_code=499)  # nobody reads it; the access log does

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
