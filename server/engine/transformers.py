"""The CPU default engine: transformers + peft, one worker thread, batched decoding with a KV cache.

Requests queue up; the worker takes up to `max_batch_size` rows that use the same adapter, prefills them
together (left padding), then decodes step by step, dropping rows from the batch as they finish so that short
answers return at once. The model never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from server.engine.base import (
    ChatMessage,
    Completion,
    EngineError,
    FinishReason,
    Generation,
    SamplingParams,
    is_token_ids,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False


@dataclass(eq=False)
class _Command:
    """Work that must run on the model's thread (adapter load/unload) but is not a generation."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(eq=False)
class _Row:
    job: _Job
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut the text
    finish_reason: FinishReason | None = None


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any, error: bool = False) -> None:
    def settle() -> None:
        if future.done():  # the caller went away
            return
        if error:
            future.set_exception(value)
        else:
            future.set_result(value)

    loop.call_soon_threadsafe(settle)


class TransformersEngine:
    """Engine protocol implementation over a Hugging Face checkpoint directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        num_threads: int | None = None,
    ) -> None:
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.eval()
        config_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_model_len = min(config_len, max_model_len) if max_model_len else config_len
        self.max_batch_size = max_batch_size
        self._eos_ids = self._collect_eos_ids()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else next(iter(self._eos_ids), 0)
        self._adapters: dict[str, str] = {}
        self._queue: queue.Queue[_Job | _Command | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="toolace-engine", daemon=True)
        self._thread.start()

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- public API (event-loop side) ----

    def encode_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=list(tools) if tools else None,
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    async def generate(
        self,
        prompt: Sequence[int] | Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> Generation:
        ids = list(prompt) if is_token_ids(prompt) else self.encode_chat(prompt)  # type: ignore[arg-type]
        if not ids:
            raise EngineError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise EngineError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context length ({self.max_model_len})"
            )
        if adapter is not None and adapter not in self._adapters:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        if params.n < 1:
            raise EngineError("n must be at least 1")
        loop = asyncio.get_running_loop()
        job = _Job(ids, params, adapter, loop.create_future(), loop)
        self._queue.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the worker drops its rows at the next step
            raise

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def load_adapter(self, name: str, path: str | Path) -> None:
        def load() -> None:
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
            self._adapters[name] = str(path)

        await self._on_worker(load)

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            if name not in self._adapters:
                raise EngineError(f"adapter {name!r} is not loaded")
            self.model.delete_adapter(name)
            del self._adapters[name]

        await self._on_worker(unload)

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    async def _on_worker(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        command = _Command(fn, loop.create_future(), loop)
        self._queue.put(command)
        return await command.future

    # ---- worker thread ----

    def _run(self) -> None:
        waiting: deque[_Job] = deque()
        while True:
            block = not waiting  # sleep on the queue only when there is nothing to do
            while True:
                try:
                    item = self._queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    for job in waiting:
                        _resolve(job.loop, job.future, EngineError("the engine is shutting down"), error=True)
                    return
                if isinstance(item, _Command):
                    self._run_command(item)
                else:
                    waiting.append(item)
            batch = self._take_batch(waiting)
            if batch:
                self._run_batch(batch)

    def _run_command(self, command: _Command) -> None:
        try:
            with torch.inference_mode():
                _resolve(command.loop, command.future, command.fn())
        except Exception as exc:  # report to the caller; the worker keeps serving
            _resolve(command.loop, command.future, exc, error=True)

    def _take_batch(self, waiting: deque[_Job]) -> list[_Job]:
        """Oldest job first, plus later jobs on the same adapter while the row budget lasts."""
        while waiting and waiting[0].cancelled:
            waiting.popleft()
        if not waiting:
            return []
        first = waiting.popleft()
        batch, rows, skipped = [first], first.params.n, deque()
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

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            with torch.inference_mode(), self._adapter_scope(jobs[0].adapter):
                self._decode(jobs)
        except Exception as exc:
            log.exception("generation failed for a batch of %d requests", len(jobs))
            for job in jobs:
                _resolve(job.loop, job.future, exc, error=True)

    def _adapter_scope(self, adapter: str | None) -> Any:
        if not self._adapters:
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    def _decode(self, jobs: list[_Job]) -> None:
        longest = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), longest), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), longest), dtype=torch.long)
        for i, job in enumerate(jobs):
            input_ids[i, longest - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention[i, longest - len(job.prompt_ids) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]

        # n > 1: the prompt is prefilled once, its cache rows are then copied per sample.
        rows = [_Row(job, self._generator(job.params, k)) for job in jobs for k in range(job.params.n)]
        if len(rows) != len(jobs):
            index = torch.tensor([i for i, job in enumerate(jobs) for _ in range(job.params.n)])
            cache.batch_select_indices(index)
            logits, attention, positions = logits[index], attention[index], positions[index]
        last_pos = positions[:, -1]
        rows_of = {id(job): [row for row in rows if row.job is job] for job in jobs}

        while True:
            tokens = self._sample(logits, rows)
            for row, token in zip(rows, tokens, strict=True):
                self._advance(row, token)
                job_rows = rows_of[id(row.job)]
                if row.finish_reason is not None and all(r.finish_reason for r in job_rows):
                    self._finish(row.job, job_rows)
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if not keep:
                return
            if len(keep) != len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                attention, last_pos = attention[index], last_pos[index]
                rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            logits = self.model(
                input_ids=torch.tensor(tokens, dtype=torch.long).unsqueeze(1),
                attention_mask=attention,
                position_ids=last_pos.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]

    @staticmethod
    def _generator(params: SamplingParams, k: int) -> torch.Generator | None:
        if params.greedy:
            return None
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + k)
        return generator

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            params = row.job.params
            if params.greedy:
                continue
            scores = logits[i].float() / params.temperature
            probs = torch.softmax(scores, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
        return tokens

    def _advance(self, row: _Row, token: int) -> None:
        params = row.job.params
        if row.job.cancelled:
            row.finish_reason = "abort"
            return
        if token in self._eos_ids:
            row.finish_reason = "stop"
            return
        row.token_ids.append(token)
        if params.stop:
            text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = text[:cut], "stop"
                return
        if len(row.token_ids) >= params.max_tokens:
            row.finish_reason = "length"

    def _finish(self, job: _Job, job_rows: list[_Row]) -> None:
        completions = tuple(
            Completion(
                text=row.text
                if row.text is not None
                else self.tokenizer.decode(row.token_ids, skip_special_tokens=True),
                token_ids=tuple(row.token_ids),
                finish_reason=row.finish_reason or "stop",
            )
            for row in job_rows
        )
        _resolve(job.loop, job.future, Generation(prompt_tokens=len(job.prompt_ids), completions=completions))
