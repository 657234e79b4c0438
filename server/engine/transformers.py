"""The CPU default engine: transformers + peft, one worker thread, batched decoding with a KV cache.

Requests queue up; the worker takes up to `max_batch_size` rows that use the same adapter, prefills them
together, then decodes step by step, dropping rows from the batch as they finish so that short answers return
at once; requests that arrive meanwhile are prefilled and join the running batch in the freed rows, so that a
long answer does not hold up the queue behind it. The model never runs on the event loop.

Two things make refinement rounds cheap (both exact: the text is what plain greedy decoding gives):
- prefix reuse: a prompt that starts like an earlier sequence (the previous round) reuses its KV cache
  (`PrefixCache`) and computes only its new tokens;
- draft verification: a greedy request may carry a draft (the previous round's answer). It is fed after the
  prompt in the same forward pass; the model's argmax at each draft position says how much of it greedy decoding
  would produce, that much is accepted at once, and decoding goes on from the first mismatch.

Rows in one batch may thus start with different amounts of cached KV: the batch cache is laid out right-aligned,
with an attention mask that hides left padding and rejected draft positions; every row carries its own positions.

Beside this module: jobs.py (the queue between the event loop and the worker, and which jobs batch together),
token_sampling.py (each row's next token, masks, log-probabilities, draft verification), batch_layout.py (the
right-aligned batch cache), prefix_cache.py. Here: the public API, the worker loop, prefill and decoding, stop
strings and streaming, and peft adapters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from server.engine import grouped_attention
from server.engine.base import (
    ChatMessage,
    Completion,
    EngineError,
    Generation,
    SamplingParams,
    checked_prompt_ids,
    context_length,
    encode_chat,
    eos_token_ids,
)
from server.engine.batch_layout import batch_cache, keys_values, stack
from server.engine.constrained import SchemaConstraints
from server.engine.dtypes import resolve_dtype
from server.engine.jobs import Command, Job, JobQueue, Row, resolve, sample_numbers
from server.engine.prefix_cache import PrefixCache, PrefixEntry
from server.engine.token_sampling import TokenSampler

log = logging.getLogger(__name__)

MAX_DRAFT_TOKENS = 256  # a verification pass keeps logits for every draft position: bound its memory


class TransformersEngine:
    """Engine protocol implementation over a Hugging Face checkpoint directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",  # or "auto" (server/engine/dtypes.py)
        num_threads: int | None = None,
        prefix_cache_tokens: int = 65536,
        continuous_batching: bool = True,  # False: a batch admits nobody until it ends (the benchmark's baseline)
        attn_implementation: str | None = None,  # None: grouped_attention's; "sdpa": transformers' (a baseline)
    ) -> None:
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        grouped_attention.register()
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir,
            dtype=getattr(torch, resolve_dtype(dtype)),
            attn_implementation=attn_implementation or grouped_attention.NAME,
        )
        self.model.eval()
        self.max_model_len = context_length(self.model.config, max_model_len)
        self.max_batch_size = max_batch_size
        self.continuous_batching = continuous_batching
        self._eos_ids = eos_token_ids(
            self.tokenizer, [getattr(self.model, "generation_config", None), self.model.config]
        )
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else next(iter(self._eos_ids), 0)
        self._adapters: dict[str, str] = {}  # served name -> peft's name for it
        self._loads = 0
        self._constraints = SchemaConstraints(self.tokenizer, self._eos_ids)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._sampler = TokenSampler(self._constraints, self._decode_text)
        self._jobs = JobQueue(max_batch_size)
        self._thread = threading.Thread(target=self._run, name="toolace-engine", daemon=True)
        self._thread.start()

    # ---- public API (event-loop side) ----

    def encode_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        return encode_chat(self.tokenizer, messages, tools)

    async def generate(
        self,
        prompt: Sequence[int] | Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
        draft: Sequence[int] | None = None,
        cache_salt: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        ids = checked_prompt_ids(prompt, params, self.max_model_len, self.encode_chat)
        if adapter is not None and adapter not in self._adapters:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        loop = asyncio.get_running_loop()
        # Drafts are verified without sampling, so without per-token log-probabilities: not for requests wanting them.
        # Under a schema or grammar too: a draft token is accepted only where the matcher allows it (exact).
        plain_greedy = params.greedy and params.n == 1 and params.logprobs is None
        usable_draft = list(draft or ())[:MAX_DRAFT_TOKENS] if plain_greedy else []
        streamed = on_text if params.n == 1 else None
        job = Job(ids, params, adapter, usable_draft, cache_salt, streamed, loop.create_future(), loop)
        self._jobs.put(job)
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

            # peft names modules after the adapter and refuses "." (`qwen2.5-…`): it gets a name of its own
            self._loads += 1
            peft_name = f"adapter_{self._loads}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=peft_name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=peft_name)
            self.model.eval()
            self._adapters[name] = peft_name
            if self.prefix_cache:
                self.prefix_cache.clear_adapter(name)

        await self._on_worker(load)

    async def unload_adapter(self, name: str) -> None:
        def unload() -> None:
            if name not in self._adapters:
                raise EngineError(f"adapter {name!r} is not loaded")
            self.model.delete_adapter(self._adapters.pop(name))
            if self.prefix_cache:
                self.prefix_cache.clear_adapter(name)

        await self._on_worker(unload)

    async def close(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    async def _on_worker(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        command = Command(fn, loop.create_future(), loop)
        self._jobs.put(command)
        return await command.future

    # ---- worker thread ----

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            jobs.pull(block=not jobs.waiting and not jobs.commands)  # sleep only when there is nothing to do
            while jobs.commands:
                self._run_command(jobs.commands.popleft())
            if jobs.closing:
                for job in jobs.waiting:
                    resolve(job.loop, job.future, EngineError("the engine is shutting down"), error=True)
                return
            batch = self._jobs.take_batch()
            if batch:
                self._run_batch(batch)

    def _run_command(self, command: Command) -> None:
        try:
            with torch.inference_mode():
                resolve(command.loop, command.future, command.fn())
        except Exception as exc:  # report to the caller; the worker keeps serving
            resolve(command.loop, command.future, exc, error=True)

    def _run_batch(self, jobs: list[Job]) -> None:
        try:
            with torch.inference_mode(), self._adapter_scope(jobs[0].adapter):
                self._decode_and_admit(jobs)
        except Exception as exc:
            log.exception("generation failed for a batch of %d requests", len(jobs))
            for job in jobs:
                if job.finished:
                    continue
                if len(jobs) > 1 and not job.sent_text:  # one bad request must not fail the others: rerun alone
                    self._run_batch([job])
                else:
                    resolve(job.loop, job.future, exc, error=True)

    @property
    def _network(self) -> Any:
        """What a forward pass calls. Once every adapter is unloaded, peft still names a deleted one as active and
        its forward fails on it; the wrapped model (LoRA layers without adapters act as the base) runs instead."""
        if self._adapters or not hasattr(self.model, "get_base_model"):
            return self.model
        return self.model.base_model.model  # not get_base_model(): it looks up the deleted adapter too

    def _adapter_scope(self, adapter: str | None) -> Any:
        if not self._adapters:
            return nullcontext()
        # peft's active adapter may be one unloaded since (loading another does not switch to it), and
        # disable_adapter looks the active one up: point it at a loaded adapter first, for base rows too.
        self.model.set_adapter(self._adapters[adapter] if adapter is not None else next(iter(self._adapters.values())))
        return self.model.disable_adapter() if adapter is None else nullcontext()

    def _decode_and_admit(self, jobs: list[Job]) -> None:
        """Decode a batch to its end. Jobs that arrive meanwhile join it in the rows finished ones free (continuous
        batching), so one long answer does not hold up requests queued behind it; `jobs` grows as they join."""
        cache, attention, rows, next_tokens = self._start(jobs)
        rows_of = {id(job): [row for row in rows if row.job is job] for job in jobs}
        while True:
            done = [row.finish_reason is not None for row in rows]
            for row in (r for r, d in zip(rows, done, strict=True) if d):
                self._store_prefix(row, rows.index(row), cache, attention)
                job_rows = rows_of[id(row.job)]
                if all(r.finish_reason for r in job_rows) and not row.job.future.done():
                    self._finish(row.job, job_rows)
            keep = [i for i, d in enumerate(done) if not d]
            if not keep:
                return
            if len(keep) != len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                attention = attention[index]
                rows, next_tokens = [rows[i] for i in keep], [next_tokens[i] for i in keep]
            joining = (
                self._jobs.admit(jobs[0].adapter, self.max_batch_size - len(rows)) if self.continuous_batching else []
            )
            if joining:
                jobs += joining
                new_cache, new_attention, new_rows, new_next = self._start(joining)
                rows_of.update({id(job): [row for row in new_rows if row.job is job] for job in joining})
                cache, attention = stack(cache, attention, new_cache, new_attention)
                rows, next_tokens = rows + new_rows, next_tokens + new_next
                continue  # a joining row may be finished already
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            positions = torch.tensor([[row.position] for row in rows], dtype=torch.long)
            for row, token in zip(rows, next_tokens, strict=True):
                row.fed.append(token)
            logits = self._network(
                input_ids=torch.tensor(next_tokens, dtype=torch.long).unsqueeze(1),
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
            next_tokens = self._sampler.sample(logits, rows)
            for row, token in zip(rows, next_tokens, strict=True):
                self._advance(row, token)

    def _start(self, jobs: list[Job]) -> tuple[DynamicCache, torch.Tensor, list[Row], list[int]]:
        """Prefill jobs and take in the tokens that pass emits. Returns their cache, its attention mask, one row
        per sample, and each row's next token to feed."""
        cache, attention, rows, emitted = self._prefill(jobs)
        for row, tokens in zip(rows, emitted, strict=True):
            for token in tokens:
                self._advance(row, token)
                if row.finish_reason is not None:
                    break
        return cache, attention, rows, [tokens[-1] for tokens in emitted]

    def _prefill(self, jobs: list[Job]) -> tuple[DynamicCache, torch.Tensor, list[Row], list[list[int]]]:
        """One forward pass over every job's uncached prompt tokens (and draft). Returns the batch cache, its
        attention mask, one row per sample, and the tokens each row emits from this pass."""
        reused = [self._lookup_prefix(job) for job in jobs]
        cached = [length for _, length in reused]
        fresh = [job.prompt_ids[c:] + job.draft for job, c in zip(jobs, cached, strict=True)]
        width_cached, width_new = max(cached), max(len(f) for f in fresh)
        cache = batch_cache(reused, width_cached)
        attention = torch.zeros((len(jobs), width_cached + width_new), dtype=torch.long)
        input_ids = torch.full((len(jobs), width_new), self._pad_id, dtype=torch.long)
        positions = torch.zeros((len(jobs), width_new), dtype=torch.long)
        for i, (c, new) in enumerate(zip(cached, fresh, strict=True)):
            attention[i, width_cached - c : width_cached] = 1
            attention[i, attention.shape[1] - len(new) :] = 1
            input_ids[i, width_new - len(new) :] = torch.tensor(new)
            positions[i, width_new - len(new) :] = torch.arange(c, c + len(new))
        keep = 1 + max(len(job.draft) for job in jobs)
        logits = self._network(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits

        # n > 1: the prompt is prefilled once, then its cache row is copied for every sample.
        index = [i for i, job in enumerate(jobs) for _ in range(job.params.n)]
        if len(index) != len(jobs):
            cache.batch_select_indices(torch.tensor(index))
            attention, logits = attention[index], logits[index]
        rows = [
            Row(
                jobs[i],
                self._sampler.generator(jobs[i].params, k),
                self._sampler.matcher(jobs[i].params),
                list(jobs[i].prompt_ids),
            )
            for i, k in zip(index, sample_numbers(jobs), strict=True)
        ]
        emitted = [[token] for token in self._sampler.sample(logits[:, -1, :], rows)]
        for r, row in enumerate(rows):
            if row.job.draft:
                emitted[r] = self._sampler.verify_draft(row, logits[r], attention[r])
        return cache, attention, rows, emitted

    def _lookup_prefix(self, job: Job) -> tuple[PrefixEntry | None, int]:
        if self.prefix_cache is None:
            return None, 0
        entry, length = self.prefix_cache.lookup(torch.tensor(job.prompt_ids), job.adapter, job.cache_salt)
        length = min(length, len(job.prompt_ids) - 1)  # the last prompt token must run: it yields the logits
        if entry is None or length <= 0:
            return None, 0
        self.prefix_cache.record_hit(length)
        job.cached_tokens = length
        return entry, length

    def _store_prefix(self, row: Row, index: int, cache: DynamicCache, attention: torch.Tensor) -> None:
        """Keep a finished row's live keys/values so a later prompt that starts the same way can reuse them."""
        if self.prefix_cache is None or row.finish_reason == "abort" or row.job.params.n != 1:
            return
        live = attention[index].nonzero().squeeze(-1)
        if live.numel() != len(row.fed):  # cannot happen by construction; never store a misaligned entry
            log.warning("prefix cache: %d live positions for %d tokens; not stored", live.numel(), len(row.fed))
            return
        layers = tuple(
            (keys[index][:, live].clone(), values[index][:, live].clone())
            for keys, values in map(keys_values, cache.layers)
        )
        self.prefix_cache.store(PrefixEntry(torch.tensor(row.fed), layers, row.job.adapter, row.job.cache_salt))

    def _advance(self, row: Row, token: int) -> None:
        params = row.job.params
        if row.job.cancelled:
            row.finish_reason = "abort"
            return
        if row.matcher is not None and not row.matcher.consume_token(token):
            log.warning("constrained decoding stopped: %s", row.matcher.get_error())
            row.matcher = None  # free decoding from here rather than a mask that allows nothing
        if token in self._eos_ids:
            row.finish_reason, row.stop_token_id = "stop", token
            return
        row.token_ids.append(token)
        if params.stop:
            text = self._decode_text(row.token_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = text[:cut], "stop"
                return
        if len(row.token_ids) >= params.max_tokens:
            row.finish_reason = "length"
        elif row.job.on_text is not None:
            self._stream(row)

    def _decode_text(self, token_ids: list[int], **kwargs: Any) -> str:
        # transformers annotates decode as `str | list[str]` (a list of lists of ids decodes to a list of strings)
        return cast(str, self.tokenizer.decode(token_ids, **kwargs))

    def _text(self, row: Row) -> str:
        return row.text if row.text is not None else self._decode_text(row.token_ids, skip_special_tokens=True)

    def _stream(self, row: Row, final: bool = False) -> None:
        """Hand the job's on_text the text not yet sent. Until the end, hold back an unfinished UTF-8 character
        and as many characters as a stop string could still claim."""
        on_text = row.job.on_text
        assert on_text is not None  # only a job with on_text streams
        text = self._text(row)
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in row.job.params.stop), default=1) - 1
            text = text[: len(text) - hold]
        if len(text) > row.streamed:
            row.job.loop.call_soon_threadsafe(on_text, text[row.streamed :])
            row.streamed = len(text)
            row.job.sent_text = True

    def _finish(self, job: Job, job_rows: list[Row]) -> None:
        if job.on_text is not None:
            self._stream(job_rows[0], final=True)
        completions = tuple(
            Completion(
                text=self._text(row),
                token_ids=tuple(row.token_ids),
                finish_reason=row.finish_reason or "stop",
                stop_token_id=row.stop_token_id,
                # the end-of-turn token was sampled too, but is no output token
                logprobs=tuple(row.logprobs[: len(row.token_ids)]) if job.params.logprobs is not None else None,
            )
            for row in job_rows
        )
        generation = Generation(
            prompt_tokens=len(job.prompt_ids),
            completions=completions,
            cached_tokens=job.cached_tokens,
            draft_tokens=len(job.draft),
            draft_accepted_tokens=job.draft_accepted,
        )
        job.finished = True
        resolve(job.loop, job.future, generation)
