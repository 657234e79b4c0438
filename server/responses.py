"""OpenAI's Responses API (`POST /v1/responses`) for function calling, as a translation over chat completions.

A Responses request becomes a `ChatCompletionRequest` (`to_chat_request`) and runs on the same serving path; its
`ChatCompletionResponse` becomes a Responses object (`from_chat`), and its stream of `chat.completion.chunk`s
becomes the Responses event stream (`sse`). The server keeps no responses: `previous_response_id` is refused, and
every response says `"store": false`; a client sends the whole conversation in `input` each time.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.engine import SamplingParams
from server.errors import APIError, BadRequest
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    FunctionSpec,
    RefineIterations,
    Temperature,
    TokenCount,
    ToolChoiceMode,
    TopLogprobs,
    TopP,
    not_text,
)
from server.refine import DEFAULT_MAX_ITERATIONS, RefineMode

log = logging.getLogger(__name__)

NON_TEXT_PARTS = ("input_image", "input_file", "input_audio")
NO_STATE = "this server keeps no responses; send the whole conversation in `input`"
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the output text's logprobs


# ---- the request ----


class ContentPart(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in NON_TEXT_PARTS:
            raise ValueError(not_text(data["type"]))
        return data


def _as_parts(value: Any) -> Any:
    """A plain string is one text part."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class InputItem(BaseModel):
    """One item of `input`: a message, a function call the model made, or a function call's output. One flat model,
    so a validation error names `input[i]` (a tagged union would put the tag into the path)."""

    type: Literal["message", "function_call", "function_call_output", "item_reference"] = "message"
    id: str | None = None  # an item_reference's (refused: nothing is stored)
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: list[ContentPart] | None = None

    _parts = field_validator("content", "output", mode="before")(_as_parts)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        needed = {
            "message": ("role", "content"),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
            "item_reference": ("id",),
        }[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(f'`{name}`' for name in missing)}")
        return self


class FunctionTool(FunctionSpec):
    """A function tool in the Responses shape: the function's fields beside `type`, not under `function`."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"only function tools are served here, not {data.get('type')!r}")
        return data


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_named(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs `name` and `schema`")
        return self


class TextConfig(BaseModel):
    format: TextFormat = TextFormat(type="text")


class ResponsesRequest(BaseModel):
    # Unknown fields are accepted and ignored (as OpenAI does); to_chat_request logs them.
    model_config = ConfigDict(extra="allow")

    model: str
    input: list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceMode | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: TokenCount | None = None
    stream: bool = False
    text: TextConfig | None = None
    # Output text logprobs come with include=["message.output_text.logprobs"] (other include values have nothing to
    # add here) or top_logprobs.
    include: list[str] | None = None
    top_logprobs: TopLogprobs | None = None
    store: bool | None = None  # accepted (OpenAI's default is true), never honoured: nothing is stored
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # ToolACE-R extensions, as on chat completions
    refine: RefineMode | None = None
    max_refine_iterations: RefineIterations = DEFAULT_MAX_ITERATIONS
    return_refinement_history: bool = False
    tool_grammar: bool | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value


# Fields that mean the same on both endpoints, copied when the request sets them (max_refine_iterations must stay
# unset when unset: the server's cap applies then).
SHARED_FIELDS = (
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "refine",
    "max_refine_iterations",
    "return_refinement_history",
    "tool_grammar",
)


def _text(parts: Sequence[ContentPart]) -> str:
    return "".join(part.text for part in parts)


def _messages(items: Sequence[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages. A function call joins the assistant message just before it (the text it said,
    or the calls before it), so a turn that made several calls is one assistant message with several tool_calls."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output or [])})
        else:
            messages.append({"role": item.role, "content": _text(item.content or [])})
    return messages


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that answers a Responses request (400 for what this server cannot do)."""
    if body.previous_response_id is not None:
        raise BadRequest(NO_STATE, param="previous_response_id")
    if body.background:
        raise BadRequest(f"background responses need stored responses, and {NO_STATE}", param="background")
    if body.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))
    for i, item in enumerate(body.input):
        if item.type == "item_reference":
            raise BadRequest(f"item references need stored items, and {NO_STATE}", param=f"input[{i}]")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + _messages(body.input)
    if not messages:
        raise BadRequest("`input` needs at least one item", param="input")
    chat: dict[str, Any] = {name: getattr(body, name) for name in SHARED_FIELDS if name in body.model_fields_set}
    chat |= {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}  # the final event carries the usage
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if wants_logprobs(body):
        chat |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
    if body.tools is not None:
        chat["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})}
            for tool in body.tools
        ]
    if isinstance(body.tool_choice, FunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    if body.text is not None and body.text.format.type != "text":
        chat["response_format"] = _response_format(body.text.format)
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # a safety net: the Responses models check the same constraints first
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise BadRequest(f"Invalid request: {first['msg']}", param=responses_param(where or None)) from exc


def wants_logprobs(body: ResponsesRequest) -> bool:
    return LOGPROBS in (body.include or ()) or body.top_logprobs is not None


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    """`text.format` in chat's `response_format` shape."""
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    inner = fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
    return {"type": "json_schema", "json_schema": inner}


def responses_param(param: str | None) -> str | None:
    """A chat request's field path (in an error raised while planning) as the Responses request's field."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"  # messages do not map one to one onto input items (instructions, merged calls)
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith("response_format"):
        return "text.format"
    if param.startswith("tools[") and ".function" in param:
        return param.replace(".function", "", 1)
    return param


# ---- the response ----


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_text_part(text, logprobs)] if status != "in_progress" else [],
    }


def _text_logprobs(body: ResponsesRequest, choice: dict[str, Any], calls: bool) -> list[dict[str, Any]] | None:
    """The output text's logprobs, in chat's per-token shape (the same as the Responses one), when asked for. An
    answer with calls has none: its tokens are the calls' text as much as the message's."""
    if not wants_logprobs(body):
        return None
    return [] if calls else list((choice.get("logprobs") or {}).get("content") or [])


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _response(
    body: ResponsesRequest,
    params: SamplingParams,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    refinement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object; sampling fields report the values used (the server's defaults where the request left
    them out)."""
    choice = body.tool_choice
    text = body.text or TextConfig()
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": params.max_tokens,
        "metadata": body.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "store": False,
        "temperature": params.temperature,
        "text": {"format": text.format.model_dump(by_alias=True, exclude_none=True)},
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
        "tools": [tool.model_dump() for tool in body.tools or []],
        "top_logprobs": body.top_logprobs,
        "top_p": params.top_p,
        "truncation": "disabled",
        "user": body.user,
        "usage": _usage(usage),
    }
    if refinement is not None:
        response["refinement"] = refinement
    return response


def from_chat(body: ResponsesRequest, params: SamplingParams, chat: ChatCompletionResponse) -> dict[str, Any]:
    """The Responses object of a finished (non-streamed) chat completion; n is 1 here."""
    completion = chat.to_json()
    choice = completion["choices"][0]
    status = _status(choice["finish_reason"])
    message = choice["message"]
    calls = message.get("tool_calls") or []
    output = []
    if message.get("content") or not calls:
        logprobs = _text_logprobs(body, choice, bool(calls))
        output.append(_message_item(_new_id("msg"), message.get("content") or "", status, logprobs))
    for call in calls:
        function = call["function"]
        output.append(_call_item(_new_id("fc"), call["id"], function["name"], function["arguments"], "completed"))
    return _response(
        body,
        params,
        response_id=_new_id("resp"),
        created_at=completion["created"],
        model=completion["model"],
        status=status,
        output=output,
        usage=completion["usage"],
        refinement=completion["refinement"],
    )


# ---- the event stream ----


class _EventStream:
    """Chat completion chunks in, Responses events out (as SSE bytes): one open output item at a time, a message
    for text, a function_call per tool call; the last event carries the whole response."""

    def __init__(self, body: ResponsesRequest, params: SamplingParams, model: str) -> None:
        self.body, self.params, self.model = body, params, model
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # finished items
        self.item: dict[str, Any] | None = None  # the open item: text or arguments still arriving
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.refinement: dict[str, Any] | None = None
        self.calls = False  # the answer has tool calls
        self.finish_choice: dict[str, Any] = {}  # the last chunk's choice: finish reason and logprobs

    def event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def response(self, status: str) -> dict[str, Any]:
        return _response(
            self.body,
            self.params,
            response_id=self.id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=self.output,
            usage=self.usage,
            refinement=self.refinement,
        )

    def start(self) -> Iterator[bytes]:
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))

    def chunk(self, chunk: dict[str, Any]) -> Iterator[bytes]:
        if chunk.get("refinement_round") is not None:  # an extension event; the OpenAI client passes it through
            yield self.event("response.refinement_round", refinement_round=chunk["refinement_round"])
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                yield from self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                if call.get("id"):
                    self.calls = True
                    yield from self.close()
                    yield from self.open_call(call["id"], call["function"]["name"])
                else:
                    yield from self.arguments(call["function"]["arguments"])
            if choice.get("finish_reason"):
                self.finish_reason, self.finish_choice = choice["finish_reason"], choice
                self.refinement = chunk.get("refinement")
                yield from self.close()

    def text(self, delta: str) -> Iterator[bytes]:
        if self.item is None or self.item["type"] != "message":
            yield from self.close()
            yield from self.open_message()
        assert self.item is not None
        self.item["text"] += delta
        yield self.event("response.output_text.delta", **self._where(), content_index=0, delta=delta, logprobs=[])

    def open_message(self) -> Iterator[bytes]:
        self.item = {"type": "message", "id": _new_id("msg"), "text": ""}
        yield self.event(
            "response.output_item.added",
            output_index=len(self.output),
            item=_message_item(self.item["id"], "", "in_progress"),
        )
        yield self.event(
            "response.content_part.added",
            **self._where(),
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )

    def open_call(self, call_id: str, name: str) -> Iterator[bytes]:
        self.item = {"type": "function_call", "id": _new_id("fc"), "call_id": call_id, "name": name, "arguments": ""}
        item = _call_item(self.item["id"], call_id, name, "", "in_progress")
        yield self.event("response.output_item.added", output_index=len(self.output), item=item)

    def arguments(self, delta: str) -> Iterator[bytes]:
        assert self.item is not None and self.item["type"] == "function_call"  # chat streams a call's head first
        self.item["arguments"] += delta
        yield self.event("response.function_call_arguments.delta", **self._where(), delta=delta)

    def close(self) -> Iterator[bytes]:
        """Finish the open item, if any."""
        item, self.item = self.item, None
        if item is None:
            return
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if item["type"] == "message":
            # chat sends the logprobs with the finish reason: a message closed before it (calls follow) has none
            text, logprobs = item["text"], _text_logprobs(self.body, self.finish_choice, self.calls)
            yield self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=logprobs or [])
            part = _text_part(text, logprobs)
            yield self.event("response.content_part.done", **where, content_index=0, part=part)
            done = _message_item(item["id"], text, _status(self.finish_reason), logprobs)
        else:
            yield self.event("response.function_call_arguments.done", **where, arguments=item["arguments"])
            done = _call_item(item["id"], item["call_id"], item["name"], item["arguments"], "completed")
        self.output.append(done)
        yield self.event("response.output_item.done", output_index=where["output_index"], item=done)

    def finish(self) -> Iterator[bytes]:
        yield from self.close()
        if not self.output:  # an empty answer is an empty message, as in the non-streamed response
            yield from self.open_message()
            yield from self.close()
        status = _status(self.finish_reason)
        yield self.event(f"response.{status}", response=self.response(status))

    def error(self, message: str, code: str | None, param: str | None) -> bytes:
        return self.event("error", code=code, message=message, param=param)

    def _where(self) -> dict[str, Any]:
        assert self.item is not None
        return {"item_id": self.item["id"], "output_index": len(self.output)}


async def sse(
    body: ResponsesRequest, params: SamplingParams, model: str, chunks: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[bytes]:
    """The Responses event stream of a streamed chat completion of `model` (the served name the request routed
    to), with no `[DONE]` line: the Responses stream has none. An error after the stream started becomes an `error`
    event, as streaming.sse does for chat."""
    events = _EventStream(body, params, model)
    try:
        for event in events.start():
            yield event
        async for chunk in chunks:
            for event in events.chunk(chunk):
                yield event
        for event in events.finish():
            yield event
    except APIError as exc:
        yield events.error(exc.message, exc.code, responses_param(exc.param))
    except Exception:
        log.exception("stream failed")
        yield events.error("The server had an error while streaming the response.", "server_error", None)
