"""Admission: a running slot for each request within its deadline, and its adapter held loaded while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from server.adapters import AdapterError, AdapterRegistry
from server.errors import GatewayTimeout, TooManyRequests
from server.limits import Limits
from server.metrics import Metrics
from server.planning import Plan


class Admission:
    def __init__(self, limits: Limits, metrics: Metrics, adapters: AdapterRegistry | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.adapters = adapters
        self._slots = asyncio.Semaphore(limits.max_active_requests)
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def admitted(self, plan: Plan) -> AsyncIterator[None]:
        """A running slot within the request's deadline: 429 when too many wait already, 504 past the deadline.
        The deadline cancels the work, which aborts the engine's generation and starts no further round."""
        limits = self.limits
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
