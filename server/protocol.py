"""Pydantic models of the OpenAI chat-completions wire format, plus our `refine` extension fields."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from server.refine import DEFAULT_MAX_ITERATIONS, MAX_ITERATIONS_LIMIT, RefineMode, StopReason

# OpenAI allows [a-zA-Z0-9_-]{1,64}; dots are accepted too so BFCL's `math.factorial` works as a tool name.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SCHEMA_OBJECT_TYPES = ("object", "dict")  # "dict" is BFCL's spelling of a JSON Schema object
ChoiceFinishReason = Literal["stop", "length", "tool_calls"]
ToolChoiceMode = Literal["none", "auto", "required"]
# Sampling bounds, OpenAI's; the chat and Responses requests share them.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TokenCount = Annotated[int, Field(ge=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
RefineIterations = Annotated[int, Field(ge=1, le=MAX_ITERATIONS_LIMIT)]


def not_text(kind: str) -> str:
    """The error for a content part this text-only server cannot take (chat and Responses alike)."""
    return f"content parts of type '{kind}' are not supported: this server takes text only"


def completion_id() -> str:
    """The id of one chat completion, shared by all the chunks of a streamed one."""
    return f"chatcmpl-{uuid.uuid4().hex}"


class _Sparse(BaseModel):
    """Fields that are None are left out of the JSON (OpenAI leaves out what a delta or an extension lacks)."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """A part this text-only server cannot take is named as such (not as a failed match against every shape)."""
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(not_text(kind))
        return content

    @model_validator(mode="after")
    def _content_present(self) -> Message:
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs `content`")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs `content` or `tool_calls`")
        return self


class FunctionSpec(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not TOOL_NAME.match(name):
            raise ValueError("a function name is 1-64 characters of letters, digits, '_', '-' or '.'")
        return name

    @field_validator("parameters")
    @classmethod
    def _json_schema_object(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        if schema.get("type", "object") not in SCHEMA_OBJECT_TYPES:
            raise ValueError('`parameters` must be a JSON Schema object ({"type": "object", "properties": {...}})')
        properties = schema.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise ValueError("`parameters.properties` must map each parameter name to a JSON Schema")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("`parameters.required` must be a list of parameter names")
        return schema


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # OpenAI's name is `schema`, which pydantic's BaseModel reserves
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's structured outputs: `json_object` (any JSON object) or `json_schema` (that schema; `strict` closes
    its objects as OpenAI's strict mode does). Both are enforced by the grammar engine, strict or not."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('a "json_schema" response_format needs `json_schema`: {"name": ..., "schema": {...}}')
        return self


class ChatCompletionRequest(BaseModel):
    # Unknown fields are accepted and ignored (as OpenAI does); the service logs them.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    cache_salt: str | None = None  # as in vLLM: only requests with the same salt share cached prefixes
    response_format: ResponseFormat | None = None
    # ToolACE-R extensions
    refine: RefineMode | None = None
    max_refine_iterations: RefineIterations = DEFAULT_MAX_ITERATIONS
    return_refinement_history: bool = False
    # false: no lazy tool-call grammar under tool_choice "auto" for this request; true: one even where the server
    # turned it off (--no-tool-grammar); unset: the server's choice.
    tool_grammar: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Refinement(_Sparse):
    mode: RefineMode
    iterations: int
    stop_reason: StopReason
    answers: list[str] | None = None  # with return_refinement_history only


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """The final answer's tokens (with refinement: the tokens of the round whose answer was returned)."""

    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: ChoiceFinishReason
    logprobs: ChoiceLogprobs | None = None
    refinement: Refinement | None = None  # per choice, when n > 1


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class CompletionTokensDetails(BaseModel):
    # OpenAI's Predicted Outputs counters; here the prediction is the previous refine round's answer.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    refinement: Refinement

    def to_json(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        for choice in body["choices"]:
            if choice["message"]["tool_calls"] is None:
                del choice["message"]["tool_calls"]
            if choice["refinement"] is None:
                del choice["refinement"]
        return body


# ---- streaming: `chat.completion.chunk`s (server/streaming.py makes them)


class FunctionDelta(_Sparse):
    name: str | None = None  # on a call's first delta
    arguments: str


class ToolCallDelta(_Sparse):
    index: int
    id: str | None = None  # id and type on a call's first delta
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChoiceFinishReason | None = None


class RefinementRound(_Sparse):
    """A refine round of one choice has ended (streamed before the answer is); `answer` with the history only."""

    choice: int
    round: int
    answer: str | None = None


class ChatCompletionChunk(_Sparse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage
    refinement: Refinement | None = None  # on a choice's last chunk
    refinement_round: RefinementRound | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "toolace-r"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapter(BaseModel):
    lora_name: str
    lora_path: str | None = None  # inside the adapters directory; default: the directory named lora_name


class UnloadLoraAdapter(BaseModel):
    lora_name: str
