"""One chat-completion request's life: plan (planning.py: every check, the prompt, the sampling settings) →
admission (admission.py: a slot within the deadline) → generate → parse → refine loop, once per choice → the
response or its chunks (reporting.py, streaming.py) and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from server import reporting, streaming, toolcalls
from server.adapters import AdapterRegistry
from server.admission import Admission
from server.config import ServingConfig
from server.engine import Engine, EngineError
from server.engine.base import seed_for
from server.errors import BadRequest
from server.metrics import Metrics
from server.planning import Plan, Planner
from server.protocol import AssistantMessage, ChatCompletionResponse, ChoiceFinishReason, ToolCallOut
from server.refine import Answer, RefineMode, RefineOutcome, run_refinement
from server.reporting import ChoiceResult, Tally

log = logging.getLogger(__name__)

RoundCallback = Callable[[int, Answer], None]


class ChatService:
    """Runs chat completions over an engine: the planner checks a request, admission gives it a slot, and each
    choice's refine loop runs here. Knows nothing of HTTP; raises APIError subclasses."""

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
        self.planner = Planner(engine, config, adapters)
        self.admission = Admission(config.limits, self.metrics, adapters)

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
        tally = Tally()
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
        async with self.admission.admitted(plan):
            results = await asyncio.gather(*(self.run_choice(plan, i) for i in range(plan.request.n)))
        response = reporting.response(plan, results)
        # The answer arrives all at once: its first token comes with the rest.
        reporting.observe(self.metrics, plan, results, ttft=time.perf_counter() - plan.start)
        return response

    async def stream(self, plan: Plan) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed completion (see streaming.py); the refine loop runs before the answer is sent."""
        async with self.admission.admitted(plan):
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
            yield chunks.finish(
                index, result.finish_reason, reporting.refinement(plan, result.outcome), result.logprobs
            )
        if plan.request.stream_options and plan.request.stream_options.include_usage:
            yield chunks.usage(reporting.usage(results))
        reporting.observe(self.metrics, plan, results, ttft=(first_token_at or time.perf_counter()) - plan.start)
