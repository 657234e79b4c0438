"""The HTTP routes. Each handler finds the ChatService, and the keys it checks, on `app.state` (set by api.create_app);
the logic lives in serving.ChatService, and the Responses API is a translation over it (responses.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import responses
from server.adapters import AdapterError, AdapterRegistry
from server.errors import APIError, NotFound, Unauthorized
from server.metrics import CONTENT_TYPE
from server.planning import Plan
from server.protocol import ChatCompletionRequest, ChatCompletionResponse, LoadLoraAdapter, UnloadLoraAdapter
from server.refine import RefineMode
from server.serving import ChatService
from server.streaming import sse

log = logging.getLogger(__name__)

# The SSE bytes of an endpoint's stream, made from the chat completion chunks (streaming.sse, responses.sse).
Framer = Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]]

_END = object()  # the end of a stream, in the queue between its producer and the response

REFINE_QUERY = Query(default=None, description="refinement mode, when the body has none")


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


def _bearer_matches(request: Request, key: str) -> bool:
    supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return secrets.compare_digest(supplied.encode(), key.encode())


async def authorize(request: Request) -> None:
    key: str | None = request.app.state.api_key
    if key is not None and not _bearer_matches(request, key):
        raise Unauthorized("Invalid API key.", code="invalid_api_key")


async def authorize_metrics(request: Request) -> None:
    if not request.app.state.metrics_public:
        await authorize(request)


async def admin_adapters(request: Request) -> AdapterRegistry:
    """The adapter registry, for a caller holding the admin key."""
    key: str | None = request.app.state.admin_api_key
    adapters = _service(request).adapters
    if key is None or adapters is None:
        raise NotFound("Adapter management is off; start the server with --admin-api-key to turn it on.")
    if not _bearer_matches(request, key):
        raise Unauthorized("Invalid admin API key.", code="invalid_api_key")
    return adapters


router = APIRouter()
api = APIRouter(dependencies=[Depends(authorize)])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", dependencies=[Depends(authorize_metrics)])
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.exposition(), media_type=CONTENT_TYPE)


# The schema is served behind the API key like everything but /health (no docs UI: nothing to click here).
@api.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


@api.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return _service(request).planner.models().model_dump(mode="json")


@api.post("/v1/chat/completions")
async def chat_completions(
    request: Request, body: ChatCompletionRequest, refine: RefineMode | None = REFINE_QUERY
) -> Response:
    service = _service(request)
    request.state.model = service.planner.model_label(body.model)
    plan = service.planner.plan(body, refine)  # every check that can fail, before any work and before a stream starts
    request.state.log = plan.log
    return await answered(request, plan, ChatCompletionResponse.to_json, sse)


@api.post("/v1/responses")
async def create_response(
    request: Request, body: responses.ResponsesRequest, refine: RefineMode | None = REFINE_QUERY
) -> Response:
    """OpenAI's Responses API, stateless, on the chat completions path (server/responses.py translates)."""
    service = _service(request)
    chat = responses.to_chat_request(body)
    request.state.model = service.planner.model_label(chat.model)
    try:
        plan = service.planner.plan(chat, refine)
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


# vLLM's request shapes, so tooling written for `vllm serve` manages adapters here too.
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoraAdapter, adapters: AdapterRegistry = Depends(admin_adapters)
) -> dict[str, Any]:
    try:
        info = await adapters.add(body.lora_name, body.lora_path)
    except AdapterError as exc:
        raise exc.api_error() from exc
    return {"object": "lora_adapter", "id": info.name, "rank": info.rank, "status": "loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoraAdapter, adapters: AdapterRegistry = Depends(admin_adapters)
) -> dict[str, Any]:
    try:
        await adapters.remove(body.lora_name)
    except AdapterError as exc:
        raise exc.api_error() from exc
    return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}


router.include_router(api)


async def answered(
    request: Request, plan: Plan, to_json: Callable[[ChatCompletionResponse], dict[str, Any]], frame: Framer
) -> Response:
    """Run a planned request: the whole answer as JSON (`to_json`), or streamed as the events `frame` makes of the
    chat completion chunks."""
    if plan.request.stream:
        return await streamed(request, plan, frame)
    work = asyncio.ensure_future(_service(request).complete(plan))
    if not await _finished_before_disconnect(request, work):
        return _client_went_away(request, plan)
    return JSONResponse(to_json(work.result()))


async def streamed(request: Request, plan: Plan, frame: Framer) -> Response:
    """The stream's chunks are produced in a task of their own, which holds the request's slot and deadline for its
    whole life (an asyncio deadline belongs to one task). Admission (429 when too many wait, 504 past the deadline)
    comes before the first chunk: waiting for that here makes a refusal a plain HTTP error, not an event inside a 200
    stream. After that, errors are events (`frame` turns the chunks, and an error among them, into the endpoint's SSE
    bytes); a client that goes away cancels the task."""
    chunks: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for chunk in _service(request).stream(plan):
                chunks.put_nowait(chunk)
        except Exception as exc:  # handed to the reader, which raises it where the response is being sent
            chunks.put_nowait(exc)
        else:
            chunks.put_nowait(_END)

    producer = asyncio.ensure_future(produce())
    first = asyncio.ensure_future(chunks.get())
    if not await _finished_before_disconnect(request, first):
        producer.cancel()
        return _client_went_away(request, plan)
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
                _client_went_away(request, plan)

    return StreamingResponse(frame(relay()), media_type="text/event-stream")


async def _finished_before_disconnect(request: Request, work: asyncio.Future[Any]) -> bool:
    """Wait for `work`; if the client disconnects first, cancel it (the engine aborts the generation and no further
    refine round starts) and return False."""

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


def _client_went_away(request: Request, plan: Plan) -> Response:
    _service(request).metrics.cancelled.labels(request.state.model, "client_disconnect").inc()
    plan.log["cancelled"] = "client_disconnect"
    log.info("client went away: request %s cancelled", request.state.request_id)
    return Response(status_code=499)  # nobody reads it; the access log does
