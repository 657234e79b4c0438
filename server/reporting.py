"""What a request's choices produced, as OpenAI's response and usage, and as metrics and access-log fields."""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.metrics import Metrics
from server.planning import Plan
from server.protocol import (
    AssistantMessage,
    ChatCompletionResponse,
    Choice,
    ChoiceFinishReason,
    ChoiceLogprobs,
    CompletionTokensDetails,
    PromptTokensDetails,
    Refinement,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.refine import RefineOutcome


@dataclass
class Tally:
    """Per-choice counts of the fast refinement path, summed over rounds (OpenAI's usage details)."""

    cached_tokens: int = 0
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0


@dataclass(frozen=True)
class ChoiceResult:
    outcome: RefineOutcome
    tally: Tally
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


def refinement(plan: Plan, outcome: RefineOutcome) -> Refinement:
    history = [a.text for a in outcome.answers] if plan.request.return_refinement_history else None
    return Refinement(mode=plan.mode, iterations=outcome.iterations, stop_reason=outcome.stop_reason, answers=history)


def usage(results: list[ChoiceResult]) -> Usage:
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


def response(plan: Plan, results: list[ChoiceResult]) -> ChatCompletionResponse:
    choices = [
        Choice(
            index=i,
            message=r.message,
            finish_reason=r.finish_reason,
            logprobs=r.logprobs,
            refinement=refinement(plan, r.outcome) if len(results) > 1 else None,
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(
        model=plan.model,
        choices=choices,
        usage=usage(results),
        refinement=refinement(plan, results[0].outcome),
    )


def observe(metrics: Metrics, plan: Plan, results: list[ChoiceResult], ttft: float) -> None:
    """The request's metrics, and its access-log fields (rounds, stop reason)."""
    plan.log["rounds"] = [r.outcome.iterations for r in results] if len(results) > 1 else results[0].outcome.iterations
    plan.log["stop_reason"] = results[0].outcome.stop_reason.value
    m, model, mode = metrics, plan.model, plan.mode.value
    m.duration.labels(model, mode).observe(time.perf_counter() - plan.start)
    m.ttft.labels(model, mode).observe(ttft)
    for r in results:
        m.observe_refinement(model, mode, r.outcome)
        m.cached_prompt_tokens.labels(model).inc(r.tally.cached_tokens)
        m.draft_tokens.labels(model, "accepted").inc(r.tally.accepted_draft_tokens)
        m.draft_tokens.labels(model, "rejected").inc(r.tally.rejected_draft_tokens)
        if r.finish_reason != "tool_calls" and r.outcome.final.attempted_call:
            m.parse_failures.labels(model).inc()
