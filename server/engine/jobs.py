"""The transformers engine's work: jobs (generations, one row per sample in a batch) and commands (adapter loads)
handed from the event loop to the worker thread, and the queue that decides which waiting jobs form a batch or join
a running one."""

from __future__ import annotations

import asyncio
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from llguidance import LLMatcher

from server.engine.base import FinishReason, Generation, SampledToken, SamplingParams


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    draft: list[int]  # greedy n=1 only; empty when there is none
    cache_salt: str | None
    on_text: Callable[[str], None] | None
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    cached_tokens: int = 0
    draft_accepted: int = 0
    finished: bool = False  # its result is on the way to the caller
    sent_text: bool = False  # on_text has been called: the job cannot be run again from the start


@dataclass(eq=False)
class Row:
    job: Job
    generator: torch.Generator | None
    matcher: LLMatcher | None
    fed: list[int]  # the tokens whose keys/values are live in this row of the batch cache, in order
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut the text
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    streamed: int = 0  # characters of text already handed to the job's on_text
    logprobs: list[SampledToken] = field(default_factory=list)  # per sampled token, when the job asks for them

    @property
    def position(self) -> int:
        return len(self.fed)


@dataclass(eq=False)
class Command:
    """Work that must run on the model's thread (adapter load/unload) but is not a generation."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any, error: bool = False) -> None:
    def settle() -> None:
        if future.done():  # the caller went away
            return
        if error:
            future.set_exception(value)
        else:
            future.set_result(value)

    loop.call_soon_threadsafe(settle)


def sample_numbers(jobs: list[Job]) -> list[int]:
    """For every row, which of its job's n samples it is (seeds differ per sample)."""
    return [k for job in jobs for k in range(job.params.n)]


class JobQueue:
    """Filled from the event loop (`put`), drained by the worker thread: jobs not yet in a batch, commands to run
    between batches, and whether shutdown was asked."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[Job | Command | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.commands: deque[Command] = deque()
        self.closing = False

    def put(self, item: Job | Command | None) -> None:
        """A job, a command, or None: shut down."""
        self._queue.put(item)

    def pull(self, block: bool) -> None:
        """Move everything queued to the waiting jobs and pending commands; with `block`, wait for one item."""
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                self.closing = True
            elif isinstance(item, Command):
                self.commands.append(item)
            else:
                self.waiting.append(item)

    def take_batch(self) -> list[Job]:
        """Oldest job first, plus later jobs on the same adapter while the row budget lasts."""
        waiting = self.waiting
        while waiting and waiting[0].cancelled:
            waiting.popleft()
        if not waiting:
            return []
        first = waiting.popleft()
        batch, rows = [first], first.params.n
        skipped: deque[Job] = deque()
        while waiting and rows < self.max_batch_size:
            job = waiting.popleft()
            if job.cancelled:
                continue
            if job.adapter == first.adapter and rows + job.params.n <= self.max_batch_size:
                batch.append(job)
                rows += job.params.n
            else:
                skipped.append(job)
        waiting.extendleft(reversed(skipped))
        return batch

    def admit(self, adapter: str | None, free_rows: int) -> list[Job]:
        """Waiting jobs that may join a running batch: oldest first, on its adapter, while its free rows last.
        Strictly in order, so that a job on another adapter (or a pending adapter command) is never overtaken
        for long: the batch then stops admitting, drains, and the next one starts with it."""
        self.pull(block=False)
        admitted: list[Job] = []
        while self.waiting and not self.commands and not self.closing:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if job.adapter != adapter or job.params.n > free_rows:
                break
            admitted.append(self.waiting.popleft())
            free_rows -= job.params.n
        return admitted
