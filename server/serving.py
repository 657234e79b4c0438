"""One chat-completion request's life: validate → build prompt → generate → parse → refine loop → response.

`plan` does every check that can fail because of the request, before any work and before a stream starts (so a
bad request is a clean 4xx, never an error in the middle of a stream). `complete` and `stream` then run the refine
loop once per choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server import streaming, toolcalls
from server.adapters import AdapterError, AdapterRegistry
from server.engine import Engine, EngineError, SamplingParams
from server.engine.base import seed_for
from server.engine.constrained import added_tokens, grammar_error, schema_error
from server.errors import BadRequest, GatewayTimeout, NotFound, TooManyRequests
from server.limits import Limits, check_request
from server.metrics import UNKNOWN_MODEL, Metrics
from server.prompts import Prompt, PromptFormat, build_prompt
from server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceFinishReason,
    ChoiceLogprobs,
    CompletionTokensDetails,
    ModelCard,
    ModelList,
    NamedToolChoice,
    PromptTokensDetails,
    Refinement,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from server.refine import Answer, RefineMode, RefineOutcome, run_refinement
from server.tool_choice import call_or_answer_schema, call_schema, closed, constraint_schema
from server.tool_grammar import tool_grammar

log = logging.getLogger(__name__)

# Room a refine round adds to the context: the previous answer (<= max_tokens) plus the refine prompt turn.
REFINE_PROMPT_ALLOWANCE = 64


@dataclass(frozen=True)
class ServingConfig:
    served_model_name: str
    model_aliases: tuple[str, ...] = ()  # more names clients may send for the base model (answers name the first)
    prompt_format: PromptFormat = PromptFormat.PYTHONIC
    default_temperature: float = 0.0  # greedy unless asked: refinement converges on deterministic answers
    default_max_tokens: int = 512
    # Greedy refine rounds hand the previous answer to the engine as a draft to verify in one pass (exact).
    draft_refinement: bool = True
    # tool_choice "auto" decodes under the lazy tool-call grammar (server/tool_grammar.py): free text, well-formed
    # calls. A request's `tool_grammar` field overrides it. Off until BFCL measures it better (RESULTS.md).
    tool_grammar: bool = False
    limits: Limits = Limits()
    log_prompts: bool = False  # the access log carries no request content unless asked


@dataclass
class _Tally:
    """Per-choice counts of the fast refinement path, summed over rounds (OpenAI's usage details)."""

    cached_tokens: int = 0
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0


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


@dataclass(frozen=True)
class ChoiceResult:
    outcome: RefineOutcome
    tally: _Tally
    message: AssistantMessage
    finish_reason: ChoiceFinishReason

    @property
    def logprobs(self) -> ChoiceLogprobs | None:
        """OpenAI's logprobs for the returned answer's tokens, when they were asked for."""
        tokens = self.outcome.final.logprobs
        if tokens is None:
            return None

        content = [
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[TopLogprob(token=a, logprob=lp, bytes=list(a.encode())) for a, lp in t.top],
            )
            for t in tokens
        ]
        return ChoiceLogprobs(content=content)


RoundCallback = Callable[[int, Answer], None]


class ChatService:
    """Runs chat completions over an engine. Knows nothing of HTTP; raises APIError subclasses."""

    def __init__(
        self,
        engine: Engine,
        config: ServingConfig,
        metrics: Metrics | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()
        self.adapters = adapters
        self._slots = asyncio.Semaphore(config.limits.max_active_requests)
        self._waiting = 0

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

    @contextlib.asynccontextmanager
    async def _admitted(self, plan: Plan) -> AsyncIterator[None]:
        """A running slot within the request's deadline: 429 when too many wait already, 504 past the deadline.
        The deadline cancels the work, which aborts the engine's generation and starts no further round."""
        limits = self.config.limits
        if self._slots.locked() and self._waiting >= limits.max_queued_requests:
            self.metrics.rejected.labels(plan.model).inc()
            raise TooManyRequests(
                f"The server is at capacity ({limits.max_queued_requests} requests waiting); retry shortly.",
                code="server_busy",
            )
        try:
            async with asyncio.timeout(limits.request_timeout - (time.perf_counter() - plan.start)):
                self._waiting += 1
                try:
                    await self._slots.acquire()
                finally:
                    self._waiting -= 1
                try:
                    async with self._holding(plan):
                        yield
                finally:
                    self._slots.release()
        except TimeoutError as exc:
            self.metrics.cancelled.labels(plan.model, "timeout").inc()
            raise GatewayTimeout(
                f"The request did not finish within {limits.request_timeout:g} s.", code="request_timeout"
            ) from exc

    @contextlib.asynccontextmanager
    async def _holding(self, plan: Plan) -> AsyncIterator[None]:
        """Keep the plan's adapter loaded while it runs (it may have been dropped as least recently used)."""
        if self.adapters is None or plan.adapter is None:
            yield
            return
        try:
            async with self.adapters.use(plan.adapter):
                yield
        except AdapterError as exc:
            raise exc.api_error(param="model") from exc

    # ---- validation ----

    def plan(self, request: ChatCompletionRequest, refine_query: RefineMode | None = None) -> Plan:
        start = time.perf_counter()
        adapter = self._route(request.model)
        self._check_choices(request)
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
        params = self._sampling(request)
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

    def _route(self, model: str) -> str | None:
        """The adapter a model name routes to (None for the base model); 404 for an unknown name."""
        if model in self.base_names:
            return None
        if model in self.adapter_names():
            return model
        known = ", ".join([*self.base_names, *self.adapter_names()])
        raise NotFound(f"The model '{model}' does not exist. Available: {known}", param="model", code="model_not_found")

    def _check_choices(self, request: ChatCompletionRequest) -> None:
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

    def _sampling(self, request: ChatCompletionRequest) -> SamplingParams:
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
            schema = call_or_answer_schema(tools, parallel, answer) if tools and choice != "none" else answer
            if error := schema_error(schema):
                if tools and choice != "none" and not schema_error(answer):
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

    # ---- running ----

    async def run_choice(
        self,
        plan: Plan,
        index: int = 0,
        *,
        on_text: Callable[[str], None] | None = None,
        on_round: RoundCallback | None = None,
    ) -> ChoiceResult:
        """One choice's refine loop. `on_text` streams the text of round 0 as it is generated (refine=none only)."""
        params = plan.params
        if index and params.seed is not None:  # n > 1 with a seed: each choice its own, reproducible stream
            params = dataclasses.replace(params, seed=seed_for(params.seed, index))
        tally = _Tally()
        draft: list[int] | None = None
        rounds = 0

        async def answer(previous: str | None) -> Answer:
            nonlocal draft, rounds
            context = plan.prompt if previous is None else plan.prompt.with_refinement(previous)
            ids = self.engine.encode_chat(context.messages, context.tools)
            try:
                generation = await self.engine.generate(
                    ids, params, plan.adapter, draft=draft, cache_salt=plan.request.cache_salt, on_text=on_text
                )
            except EngineError as exc:
                raise BadRequest(str(exc), param="messages") from exc
            tally.cached_tokens += generation.cached_tokens
            tally.accepted_draft_tokens += generation.draft_accepted_tokens
            tally.rejected_draft_tokens += generation.draft_tokens - generation.draft_accepted_tokens
            if self.config.draft_refinement and params.greedy:
                draft = generation.completions[0].as_draft  # the next round most often repeats this answer
            parsed = toolcalls.parse_answer(generation.text) if plan.use_tools else None
            result = Answer(
                text=generation.text,
                canonical=toolcalls.canonical(parsed or generation.text),
                attempted_call=plan.use_tools and toolcalls.looks_like_call(generation.text),
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                finish_reason=generation.finish_reason,
                logprobs=generation.completions[0].logprobs,
            )
            if on_round:
                on_round(rounds, result)
            rounds += 1
            return result

        outcome = await run_refinement(answer, plan.mode, plan.max_rounds)
        message, finish_reason = self._final_message(plan, outcome)
        return ChoiceResult(outcome, tally, message, finish_reason)

    def _final_message(self, plan: Plan, outcome: RefineOutcome) -> tuple[AssistantMessage, ChoiceFinishReason]:
        final = outcome.final
        request = plan.request
        parsed = toolcalls.parse_answer(final.text) if plan.use_tools else None
        known = {tool.function.name for tool in request.tools or []}
        # A call to a tool the client did not offer cannot be dispatched: it comes back as text instead.
        if parsed and parsed.tool_calls and all(call.name in known for call in parsed.tool_calls):
            chosen = parsed.tool_calls[:1] if request.parallel_tool_calls is False else parsed.tool_calls
            calls = [ToolCallOut.model_validate(c) for c in toolcalls.to_openai(chosen)]
            return AssistantMessage(content=parsed.content, tool_calls=calls), "tool_calls"
        return AssistantMessage(content=final.text), "length" if final.finish_reason == "length" else "stop"

    async def complete(self, plan: Plan) -> ChatCompletionResponse:
        async with self._admitted(plan):
            results = await asyncio.gather(*(self.run_choice(plan, i) for i in range(plan.request.n)))
        response = self.response(plan, results)
        self.observe(plan, results, ttft=time.perf_counter() - plan.start)  # the answer arrives all at once
        return response

    async def stream(self, plan: Plan) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed completion (see streaming.py); the refine loop runs before the answer is sent."""
        async with self._admitted(plan):
            async for chunk in self._stream(plan):
                yield chunk

    async def _stream(self, plan: Plan) -> AsyncIterator[dict[str, Any]]:
        chunks = streaming.ChunkFactory(plan.model)
        yield chunks.role(range(plan.request.n))
        first_token_at: float | None = None
        live = plan.mode is RefineMode.NONE and not plan.use_tools and plan.request.n == 1
        if live:  # nothing to decide after generation: stream tokens as they come
            deltas: asyncio.Queue[str | None] = asyncio.Queue()
            task = asyncio.create_task(self.run_choice(plan, on_text=deltas.put_nowait))
            task.add_done_callback(lambda _: deltas.put_nowait(None))
            try:
                while (delta := await deltas.get()) is not None:
                    if delta:
                        first_token_at = first_token_at or time.perf_counter()
                        yield chunks.content(0, delta)
                results = [await task]
            finally:
                task.cancel()
        else:
            rounds: asyncio.Queue[tuple[int, int, Answer] | None] = asyncio.Queue()

            def on_round(index: int) -> RoundCallback:
                return lambda number, answer: rounds.put_nowait((index, number, answer))

            tasks = [asyncio.create_task(self.run_choice(plan, i, on_round=on_round(i))) for i in range(plan.request.n)]
            gathered = asyncio.gather(*tasks)
            gathered.add_done_callback(lambda _: rounds.put_nowait(None))
            try:
                while (item := await rounds.get()) is not None:
                    index, number, answer = item
                    text = answer.text if plan.request.return_refinement_history else None
                    yield chunks.round_report(index, number, text)
                results = list(await gathered)
            finally:
                for task in tasks:
                    task.cancel()
            first_token_at = time.perf_counter()
            for index, result in enumerate(results):
                for chunk in chunks.answer(index, result.message):
                    yield chunk
        for index, result in enumerate(results):
            logprobs = result.logprobs
            refinement = self._refinement(plan, result.outcome).model_dump()
            yield chunks.finish(
                index, result.finish_reason, refinement, logprobs.model_dump() if logprobs is not None else None
            )
        if plan.request.stream_options and plan.request.stream_options.include_usage:
            yield chunks.usage(self._usage(results).model_dump())
        self.observe(plan, results, ttft=(first_token_at or time.perf_counter()) - plan.start)

    # ---- the response and its accounting ----

    def _refinement(self, plan: Plan, outcome: RefineOutcome) -> Refinement:
        history = [a.text for a in outcome.answers] if plan.request.return_refinement_history else None
        return Refinement(
            mode=plan.mode, iterations=outcome.iterations, stop_reason=outcome.stop_reason, answers=history
        )

    @staticmethod
    def _usage(results: list[ChoiceResult]) -> Usage:
        prompt = sum(r.outcome.prompt_tokens for r in results)
        completion = sum(r.outcome.completion_tokens for r in results)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.tally.cached_tokens for r in results)),
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=sum(r.tally.accepted_draft_tokens for r in results),
                rejected_prediction_tokens=sum(r.tally.rejected_draft_tokens for r in results),
            ),
        )

    def response(self, plan: Plan, results: list[ChoiceResult]) -> ChatCompletionResponse:
        choices = [
            Choice(
                index=i,
                message=r.message,
                finish_reason=r.finish_reason,
                logprobs=r.logprobs,
                refinement=self._refinement(plan, r.outcome) if len(results) > 1 else None,
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletionResponse(
            model=plan.model,
            choices=choices,
            usage=self._usage(results),
            refinement=self._refinement(plan, results[0].outcome),
        )

    def observe(self, plan: Plan, results: list[ChoiceResult], ttft: float) -> None:
        plan.log["rounds"] = (
            [r.outcome.iterations for r in results] if len(results) > 1 else results[0].outcome.iterations
        )
        plan.log["stop_reason"] = results[0].outcome.stop_reason.value
        m, model, mode = self.metrics, plan.model, plan.mode.value
        m.duration.labels(model, mode).observe(time.perf_counter() - plan.start)
        m.ttft.labels(model, mode).observe(ttft)
        for r in results:
            m.observe_refinement(model, mode, r.outcome)
            m.cached_prompt_tokens.labels(model).inc(r.tally.cached_tokens)
            m.draft_tokens.labels(model, "accepted").inc(r.tally.accepted_draft_tokens)
            m.draft_tokens.labels(model, "rejected").inc(r.tally.rejected_draft_tokens)
            if r.finish_reason != "tool_calls" and r.outcome.final.attempted_call:
                m.parse_failures.labels(model).inc()
