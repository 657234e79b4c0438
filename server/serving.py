"""One chat-completion request's life: validate → build prompt → generate → parse → refine loop → response."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from server import toolcalls
from server.engine import Engine, EngineError, SamplingParams
from server.errors import BadRequest, NotFound
from server.metrics import UNKNOWN_MODEL, Metrics
from server.prompts import Prompt, PromptFormat, build_prompt
from server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionTokensDetails,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Refinement,
    ToolCallOut,
    Usage,
)
from server.refine import Answer, RefineMode, RefineOutcome, run_refinement

log = logging.getLogger(__name__)

# Room a refine round adds to the context: the previous answer (<= max_tokens) plus the refine prompt turn.
REFINE_PROMPT_ALLOWANCE = 64


@dataclass(frozen=True)
class ServingConfig:
    served_model_name: str
    prompt_format: PromptFormat = PromptFormat.PYTHONIC
    default_temperature: float = 0.0  # greedy unless asked: refinement converges on deterministic answers
    default_max_tokens: int = 512
    # Greedy refine rounds hand the previous answer to the engine as a draft to verify in one pass (exact).
    draft_refinement: bool = True


@dataclass
class _Tally:
    """Per-request counts of the fast refinement path, summed over rounds (OpenAI's usage details)."""

    cached_tokens: int = 0
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0


class ChatService:
    """Runs chat completions over an engine. Knows nothing of HTTP; raises APIError subclasses."""

    def __init__(self, engine: Engine, config: ServingConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics or Metrics()

    def model_label(self, model: str) -> str:
        """The metrics label for a requested model: its name when served, else a fixed placeholder."""
        return model if model == self.config.served_model_name or model in self.engine.adapters() else UNKNOWN_MODEL

    def models(self) -> ModelList:
        base = self.config.served_model_name
        cards = [ModelCard(id=base, root=base, max_model_len=self.engine.max_model_len)]
        cards += [ModelCard(id=name, root=base, parent=base) for name in self.engine.adapters()]
        return ModelList(data=cards)

    async def complete(
        self, request: ChatCompletionRequest, refine_query: RefineMode | None = None
    ) -> ChatCompletionResponse:
        start = time.perf_counter()
        adapter = self._route(request.model)
        self._check_supported(request)
        if request.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        mode = request.refine or refine_query or RefineMode.NONE
        use_tools = bool(request.tools) and request.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []] if use_tools else None
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        try:
            prompt = build_prompt(messages, tools, self.config.prompt_format)
        except ValueError as exc:  # e.g. an assistant tool call whose arguments are not a JSON object
            raise BadRequest(str(exc), param="messages") from exc
        params = self._sampling(request)
        self._check_context(prompt, params, mode)
        tally = _Tally()
        draft: list[int] | None = None

        async def answer(previous: str | None) -> Answer:
            nonlocal draft
            context = prompt if previous is None else prompt.with_refinement(previous)
            ids = self.engine.encode_chat(context.messages, context.tools)
            try:
                generation = await self.engine.generate(
                    ids, params, adapter, draft=draft, cache_salt=request.cache_salt
                )
            except EngineError as exc:
                raise BadRequest(str(exc), param="messages") from exc
            tally.cached_tokens += generation.cached_tokens
            tally.accepted_draft_tokens += generation.draft_accepted_tokens
            tally.rejected_draft_tokens += generation.draft_tokens - generation.draft_accepted_tokens
            if self.config.draft_refinement and params.greedy:
                draft = generation.completions[0].as_draft  # the next round most often repeats this answer
            parsed = toolcalls.parse_answer(generation.text) if use_tools else None
            return Answer(
                text=generation.text,
                canonical=toolcalls.canonical(parsed or generation.text),
                attempted_call=use_tools and toolcalls.looks_like_call(generation.text),
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                finish_reason=generation.finish_reason,
            )

        outcome = await run_refinement(answer, mode, request.max_refine_iterations)
        response = self._response(request, mode, outcome, use_tools, tally)
        self._observe(request.model, mode, outcome, tally, response, time.perf_counter() - start)
        return response

    def _observe(
        self,
        model: str,
        mode: RefineMode,
        outcome: RefineOutcome,
        tally: _Tally,
        response: ChatCompletionResponse,
        seconds: float,
    ) -> None:
        m = self.metrics
        m.observe_refinement(model, mode.value, outcome)
        m.duration.labels(model, mode.value).observe(seconds)
        m.ttft.labels(model, mode.value).observe(seconds)  # non-streamed: the answer arrives all at once
        m.cached_prompt_tokens.labels(model).inc(tally.cached_tokens)
        m.draft_tokens.labels(model, "accepted").inc(tally.accepted_draft_tokens)
        m.draft_tokens.labels(model, "rejected").inc(tally.rejected_draft_tokens)
        if response.choices[0].finish_reason != "tool_calls" and outcome.final.attempted_call:
            m.parse_failures.labels(model).inc()

    def _route(self, model: str) -> str | None:
        """The adapter a model name routes to (None for the base model); 404 for an unknown name."""
        if model == self.config.served_model_name:
            return None
        if model in self.engine.adapters():
            return model
        known = ", ".join([self.config.served_model_name, *self.engine.adapters()])
        raise NotFound(f"The model '{model}' does not exist. Available: {known}", param="model", code="model_not_found")

    @staticmethod
    def _check_supported(request: ChatCompletionRequest) -> None:
        if request.n > 1:
            raise BadRequest("n > 1 is not supported; send one request per completion", param="n")
        if request.stream:
            raise BadRequest("streaming is not supported yet; send stream=false", param="stream")
        if request.tool_choice not in (None, "auto", "none"):
            raise BadRequest("tool_choice supports 'auto' and 'none' for now", param="tool_choice")

    def _sampling(self, request: ChatCompletionRequest) -> SamplingParams:
        return SamplingParams(
            max_tokens=request.max_completion_tokens or request.max_tokens or self.config.default_max_tokens,
            temperature=self.config.default_temperature if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=request.stop_sequences,
            seed=request.seed,
        )

    def _check_context(self, prompt: Prompt, params: SamplingParams, mode: RefineMode) -> None:
        prompt_tokens = len(self.engine.encode_chat(prompt.messages, prompt.tools))
        needed = prompt_tokens + params.max_tokens
        if mode is not RefineMode.NONE:
            needed += params.max_tokens + REFINE_PROMPT_ALLOWANCE
        if needed > self.engine.max_model_len:
            refine_note = " (refinement adds the previous answer and the refine prompt)" if mode.value != "none" else ""
            raise BadRequest(
                f"This model's context length is {self.engine.max_model_len} tokens; "
                f"the request needs {needed}: "
                f"{prompt_tokens} in the messages plus max_tokens {params.max_tokens}{refine_note}. "
                "Shorten the messages or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _response(
        self,
        request: ChatCompletionRequest,
        mode: RefineMode,
        outcome: RefineOutcome,
        use_tools: bool,
        tally: _Tally,
    ) -> ChatCompletionResponse:
        final = outcome.final
        parsed = toolcalls.parse_answer(final.text) if use_tools else None
        known = {tool.function.name for tool in request.tools or []}
        # A call to a tool the client did not offer cannot be dispatched: it comes back as text instead.
        if parsed and parsed.tool_calls and all(call.name in known for call in parsed.tool_calls):
            calls = [ToolCallOut.model_validate(c) for c in toolcalls.to_openai(parsed.tool_calls)]
            message = AssistantMessage(content=parsed.content, tool_calls=calls)
            finish: Any = "tool_calls"
        else:
            message = AssistantMessage(content=final.text)
            finish = "length" if final.finish_reason == "length" else "stop"
        usage = Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=tally.cached_tokens),
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=tally.accepted_draft_tokens,
                rejected_prediction_tokens=tally.rejected_draft_tokens,
            ),
        )
        refinement = Refinement(
            mode=mode,
            iterations=outcome.iterations,
            stop_reason=outcome.stop_reason,
            answers=[a.text for a in outcome.answers] if request.return_refinement_history else None,
        )
        return ChatCompletionResponse(
            model=request.model,
            choices=[Choice(index=0, message=message, finish_reason=finish)],
            usage=usage,
            refinement=refinement,
        )
