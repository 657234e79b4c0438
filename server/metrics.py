"""Every Prometheus metric the server exports, in one place.

`model` is the served model or adapter name (never a raw client string), `mode` a RefineMode, `reason` a
StopReason: label values are bounded sets, never request data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.refine import MAX_ITERATIONS_LIMIT, RefineMode, RefineOutcome, StopReason

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
UNKNOWN_MODEL = "unknown"  # requests that failed before a model was resolved
CONTENT_TYPE = CONTENT_TYPE_LATEST


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    """The server's metrics on their own registry (one per app, so tests can run several servers)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.refine_iterations = Histogram(
            "toolace_refine_iterations",
            "Refine rounds per request (0 for refine=none)",
            ["model", "mode"],
            buckets=tuple(range(MAX_ITERATIONS_LIMIT + 1)),
            registry=r,
        )
        self.refine_stops = Counter(
            "toolace_refine_stops_total", "Why refinement stopped", ["model", "mode", "reason"], registry=r
        )
        self.changed_answers = Counter(
            "toolace_refine_changed_answers_total",
            "Refine rounds whose answer differed from the previous round's",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "toolace_requests_total",
            "Chat completion and response requests by HTTP status class",
            ["model", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "toolace_requests_in_flight", "Chat completion and response requests being served", registry=r
        )
        self.rejected = Counter(
            "toolace_requests_rejected_total",
            "Requests refused with 429 because the queue was full",
            ["model"],
            registry=r,
        )
        self.cancelled = Counter(
            "toolace_requests_cancelled_total",
            "Requests whose work was stopped early, by reason (client_disconnect, timeout)",
            ["model", "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "toolace_request_duration_seconds",
            "Chat completion latency, all refine rounds included",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "toolace_time_to_first_token_seconds",
            "Time until the first token of the answer reached the client",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "toolace_prompt_tokens_total", "Prompt tokens over all refine rounds", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "toolace_generation_tokens_total", "Generated tokens over all refine rounds", ["model"], registry=r
        )
        self.parse_failures = Counter(
            "toolace_tool_call_parse_failures_total",
            "Answers that tried to call a tool but could not be turned into a valid call",
            ["model"],
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "toolace_prefix_cache_hit_tokens_total", "Prompt tokens reused from the prefix cache", ["model"], registry=r
        )
        self.draft_tokens = Counter(
            "toolace_draft_tokens_total",
            "Previous-answer draft tokens verified in refine rounds, by result (accepted, rejected)",
            ["model", "result"],
            registry=r,
        )

    def observe_refinement(self, model: str, mode: str, outcome: RefineOutcome) -> None:
        self.refine_iterations.labels(model, mode).observe(outcome.iterations)
        # Every reason this mode can stop for exists from the first request on, at 0 until it happens, so that
        # dashboard ratios such as the converged share read 0 rather than "no data".
        for reason in (
            (StopReason.NONE,) if mode == RefineMode.NONE else (StopReason.CONVERGED, StopReason.MAX_ITERATIONS)
        ):
            self.refine_stops.labels(model, mode, reason.value)
        self.refine_stops.labels(model, mode, outcome.stop_reason.value).inc()
        self.changed_answers.labels(model).inc(outcome.changed_rounds)
        self.prompt_tokens.labels(model).inc(outcome.prompt_tokens)
        self.generation_tokens.labels(model).inc(outcome.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
