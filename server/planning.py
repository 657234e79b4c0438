"""A request, checked and planned: every check that can fail because of the request happens here, before any work
and before a stream starts (so a bad request is a clean 4xx, never an error in the middle of a stream)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from server.adapters import AdapterRegistry
from server.config import ServingConfig
from server.engine import Engine, SamplingParams
from server.engine.constrained import added_tokens, grammar_error, schema_error
from server.errors import BadRequest, NotFound
from server.limits import check_request
from server.metrics import UNKNOWN_MODEL
from server.prompts import Prompt, PromptFormat, build_prompt
from server.protocol import ChatCompletionRequest, ModelCard, ModelList, NamedToolChoice
from server.refine import RefineMode
from server.tool_choice import call_or_answer_schema, call_schema, closed, constraint_schema
from server.tool_grammar import tool_grammar

log = logging.getLogger(__name__)

# Room a refine round adds to the context: the previous answer (<= max_tokens) plus the refine prompt turn.
REFINE_PROMPT_ALLOWANCE = 64


@dataclass(frozen=True)
class Plan:
    """A validated request, ready to run."""

    request: ChatCompletionRequest
    model: str  # the served model or adapter name (also the metrics label)
    adapter: str | None
    mode: RefineMode
    max_rounds: int  # the request's max_refine_iterations; when it leaves it out, the default within the server's cap
    prompt: Prompt
    params: SamplingParams
    use_tools: bool
    start: float
    # What the access log reports about this request (model, mode, rounds); filled in as it runs.
    log: dict[str, Any] = dataclasses.field(default_factory=dict)


class Planner:
    """The served model's names and adapters, and the checks and sampling settings of a request."""

    def __init__(self, engine: Engine, config: ServingConfig, adapters: AdapterRegistry | None = None) -> None:
        self.engine = engine
        self.config = config
        self.adapters = adapters

    def adapter_names(self) -> list[str]:
        return self.adapters.names() if self.adapters else []

    def model_label(self, model: str) -> str:
        """The metrics label for a requested model: its name when served, else a fixed placeholder."""
        if model in self.base_names:
            return self.config.served_model_name
        return model if model in self.adapter_names() else UNKNOWN_MODEL

    @property
    def base_names(self) -> tuple[str, ...]:
        return (self.config.served_model_name, *self.config.model_aliases)

    def models(self) -> ModelList:
        base = self.config.served_model_name
        cards = [ModelCard(id=name, root=base, max_model_len=self.engine.max_model_len) for name in self.base_names]
        cards += [ModelCard(id=name, root=base, parent=base) for name in self.adapter_names()]
        return ModelList(data=cards)

    def plan(self, request: ChatCompletionRequest, refine_query: RefineMode | None = None) -> Plan:
        start = time.perf_counter()
        adapter = self.route(request.model)
        self._check_limits_and_tool_choice(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if request.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        mode = request.refine or refine_query or RefineMode.NONE
        use_tools = bool(request.tools) and request.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []] if use_tools else None
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        try:
            prompt = build_prompt(messages, tools, self.prompt_format(adapter))
        except ValueError as exc:  # e.g. an assistant tool call whose arguments are not a JSON object
            raise BadRequest(str(exc), param="messages") from exc
        params = self.sampling(request)
        self._check_context(prompt, params, mode)
        log_fields: dict[str, Any] = {"model": request.model, "mode": mode.value, "n": request.n}
        if self.config.log_prompts:
            log_fields["messages"] = messages
        max_rounds = request.max_refine_iterations
        if "max_refine_iterations" not in request.model_fields_set:
            max_rounds = min(max_rounds, self.config.limits.max_refine_iterations)
        return Plan(
            request,
            self.model_label(request.model),
            adapter,
            mode,
            max_rounds,
            prompt,
            params,
            use_tools,
            start,
            log_fields,
        )

    def prompt_format(self, adapter: str | None) -> PromptFormat:
        """An adapter is served in the format it was trained in (its manifest); the base model in the server's."""
        info = self.adapters.info(adapter) if self.adapters and adapter else None
        return (info.prompt_format if info else None) or self.config.prompt_format

    def route(self, model: str) -> str | None:
        """The adapter a model name routes to (None for the base model); 404 for an unknown name."""
        if model in self.base_names:
            return None
        if model in self.adapter_names():
            return model
        known = ", ".join([*self.base_names, *self.adapter_names()])
        raise NotFound(f"The model '{model}' does not exist. Available: {known}", param="model", code="model_not_found")

    def _check_limits_and_tool_choice(self, request: ChatCompletionRequest) -> None:
        check_request(request, self.config.limits)
        choice = request.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not request.tools:
                raise BadRequest("tool_choice needs `tools` to choose from", param="tool_choice")
            names = {tool.function.name for tool in request.tools}
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise BadRequest(
                    f"tool_choice names '{choice.function.name}', which is not in `tools`", param="tool_choice"
                )

    def sampling(self, request: ChatCompletionRequest) -> SamplingParams:
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
        choice = request.tool_choice
        named = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        parallel = request.parallel_tool_calls is not False
        schema = constraint_schema(tools, named, parallel)
        answer = self._answer_schema(request)
        grammar = None
        if schema is not None:  # a call is due: response_format shapes text answers, and there is none
            self._check_decodable(tools, named, schema)
        elif answer is not None:
            callable_ = bool(tools) and choice != "none"  # the answer may be calls instead
            schema = call_or_answer_schema(tools, parallel, answer) if callable_ else answer
            if error := schema_error(schema):
                if callable_ and not schema_error(answer):
                    self._check_decodable(tools, "required", schema)
                raise BadRequest(f"no answer can follow the requested JSON schema: {error}", param="response_format")
        elif tools and choice in (None, "auto"):
            wanted = self.config.tool_grammar if request.tool_grammar is None else request.tool_grammar
            grammar = self._auto_grammar(tools, parallel) if wanted else None
        return SamplingParams(
            json_schema=schema,
            grammar=grammar,
            max_tokens=request.max_completion_tokens or request.max_tokens or self.config.default_max_tokens,
            temperature=self.config.default_temperature if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop_sequences,
            seed=request.seed,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        )

    @staticmethod
    def _answer_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
        """The JSON schema response_format asks a text answer to follow; None for free text."""
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return {"type": "object"}
        assert response_format.json_schema is not None  # the model's validator checked
        schema = response_format.json_schema.schema_
        return closed(schema) if response_format.json_schema.strict else schema

    def _auto_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str | None:
        """The lazy tool-call grammar of tool_choice "auto"; None (free decoding, with a warning) when the tools'
        schemas defeat the grammar engine: `auto` never refuses a request for the grammar's sake."""
        try:
            grammar = tool_grammar(
                tools, parallel=parallel, special_tokens=added_tokens(getattr(self.engine, "tokenizer", None))
            )
            error = grammar_error(grammar)
        except Exception as exc:  # a best effort: whatever a schema does to the builder, decode freely
            error = f"{type(exc).__name__}: {exc}"
        if not error:
            return grammar
        names = ", ".join(tool["function"]["name"] for tool in tools)
        log.warning("tool_choice auto without the tool-call grammar (tools: %s): %s", names, error[:500])
        return None

    @staticmethod
    def _check_decodable(tools: list[dict[str, Any]], named: Any, schema: dict[str, Any]) -> None:
        """400 naming the tool whose schema no answer can satisfy, when tool_choice makes decoding follow it."""
        if not schema_error(schema):
            return
        for i, tool in enumerate(tools):
            chosen = named == "required" or tool["function"]["name"] == named["function"]["name"]
            if chosen and (error := schema_error(call_schema(tool["function"]))):
                raise BadRequest(
                    f"tool_choice makes answers follow this tool's parameters schema, and none can: {error}",
                    param=f"tools[{i}].function.parameters",
                )
        raise BadRequest(f"no answer can follow the tools' schemas: {schema_error(schema)}", param="tools")

    def _check_context(self, prompt: Prompt, params: SamplingParams, mode: RefineMode) -> None:
        prompt_tokens = len(self.engine.encode_chat(prompt.messages, prompt.tools))
        needed = prompt_tokens + params.max_tokens
        refine_note = ""
        if mode is not RefineMode.NONE:
            needed += params.max_tokens + REFINE_PROMPT_ALLOWANCE
            refine_note = " (refinement adds the previous answer and the refine prompt)"
        if needed > self.engine.max_model_len:
            raise BadRequest(
                f"This model's context length is {self.engine.max_model_len} tokens; "
                f"the request needs {needed}: "
                f"{prompt_tokens} in the messages plus max_tokens {params.max_tokens}{refine_note}. "
                "Shorten the messages or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
