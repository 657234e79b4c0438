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
from typing import Any, cast

import torch
from llguidance import LLMatcher
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import CacheLayerMixin

from server.engine import grouped_attention
from server.engine.base import (
    ChatMessage,
    Completion,
    EngineError,
    FinishReason,
    Generation,
    SampledToken,
    SamplingParams,
    checked_prompt_ids,
    context_length,
    encode_chat,
    eos_token_ids,
    seed_for,
)
from server.engine.constrained import SchemaConstraints, mask_disallowed
from server.engine.dtypes import resolve_dtype
from server.engine.prefix_cache import PrefixCache, PrefixEntry

log = logging.getLogger(__name__)

MAX_DRAFT_TOKENS = 256  # a verification pass keeps logits for every draft position: bound its memory


@dataclass(eq=False)
class _Job:
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
class _Command:
    """Work that must run on the model's thread (adapter load/unload) but is not a generation."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(eq=False)
class _Row:
    job: _Job
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
        self._queue: queue.Queue[_Job | _Command | None] = queue.Queue()
        # the worker thread's own: jobs not yet in a batch, commands to run between batches, shutdown asked
        self._waiting: deque[_Job] = deque()
        self._commands: deque[_Command] = deque()
        self._closing = False
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
        job = _Job(ids, params, adapter, usable_draft, cache_salt, streamed, loop.create_future(), loop)
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
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 30)

    async def _on_worker(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        command = _Command(fn, loop.create_future(), loop)
        self._queue.put(command)
        return await command.future

    # ---- worker thread ----

    def _run(self) -> None:
        while True:
            self._pull(block=not self._waiting and not self._commands)  # sleep only when there is nothing to do
            while self._commands:
                self._run_command(self._commands.popleft())
            if self._closing:
                for job in self._waiting:
                    _resolve(job.loop, job.future, EngineError("the engine is shutting down"), error=True)
                return
            batch = self._take_batch(self._waiting)
            if batch:
                self._run_batch(batch)

    def _pull(self, block: bool) -> None:
        """Move everything queued to the waiting jobs and pending commands; with `block`, wait for one item."""
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                self._closing = True
            elif isinstance(item, _Command):
                self._commands.append(item)
            else:
                self._waiting.append(item)

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
        batch, rows = [first], first.params.n
        skipped: deque[_Job] = deque()
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

    def _admit(self, adapter: str | None, free_rows: int) -> list[_Job]:
        """Waiting jobs that may join a running batch: oldest first, on its adapter, while its free rows last.
        Strictly in order, so that a job on another adapter (or a pending adapter command) is never overtaken
        for long: the batch then stops admitting, drains, and the next one starts with it."""
        self._pull(block=False)
        admitted: list[_Job] = []
        while self._waiting and not self._commands and not self._closing:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if job.adapter != adapter or job.params.n > free_rows:
                break
            admitted.append(self._waiting.popleft())
            free_rows -= job.params.n
        return admitted

    def _run_batch(self, jobs: list[_Job]) -> None:
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
                    _resolve(job.loop, job.future, exc, error=True)

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

    def _decode_and_admit(self, jobs: list[_Job]) -> None:
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
            joining = self._admit(jobs[0].adapter, self.max_batch_size - len(rows)) if self.continuous_batching else []
            if joining:
                jobs += joining
                new_cache, new_attention, new_rows, new_next = self._start(joining)
                rows_of.update({id(job): [row for row in new_rows if row.job is job] for job in joining})
                cache, attention = _stack(cache, attention, new_cache, new_attention)
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
            next_tokens = self._sample(logits, rows)
            for row, token in zip(rows, next_tokens, strict=True):
                self._advance(row, token)

    def _start(self, jobs: list[_Job]) -> tuple[DynamicCache, torch.Tensor, list[_Row], list[int]]:
        """Prefill jobs and take in the tokens that pass emits. Returns their cache, its attention mask, one row
        per sample, and each row's next token to feed."""
        cache, attention, rows, emitted = self._prefill(jobs)
        for row, tokens in zip(rows, emitted, strict=True):
            for token in tokens:
                self._advance(row, token)
                if row.finish_reason is not None:
                    break
        return cache, attention, rows, [tokens[-1] for tokens in emitted]

    def _prefill(self, jobs: list[_Job]) -> tuple[DynamicCache, torch.Tensor, list[_Row], list[list[int]]]:
        """One forward pass over every job's uncached prompt tokens (and draft). Returns the batch cache, its
        attention mask, one row per sample, and the tokens each row emits from this pass."""
        reused = [self._lookup_prefix(job) for job in jobs]
        cached = [length for _, length in reused]
        fresh = [job.prompt_ids[c:] + job.draft for job, c in zip(jobs, cached, strict=True)]
        width_cached, width_new = max(cached), max(len(f) for f in fresh)
        cache = self._batch_cache(reused, width_cached)
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
            _Row(jobs[i], self._generator(jobs[i].params, k), self._matcher(jobs[i].params), list(jobs[i].prompt_ids))
            for i, k in zip(index, _sample_numbers(jobs), strict=True)
        ]
        emitted = [[token] for token in self._sample(logits[:, -1, :], rows)]
        for r, row in enumerate(rows):
            if row.job.draft:
                emitted[r] = self._verify_draft(row, logits[r], attention[r])
        return cache, attention, rows, emitted

    def _matcher(self, params: SamplingParams) -> LLMatcher | None:
        if params.json_schema is not None:
            return self._constraints.matcher(params.json_schema)
        if params.grammar is None:
            return None
        try:
            return self._constraints.grammar_matcher(params.grammar)
        except ValueError as exc:  # the caller checked it compiles; a tokenizer may still refuse it (special tokens)
            log.warning("decoding without the grammar: %s", exc)
            return None

    def _verify_draft(self, row: _Row, logits: torch.Tensor, attention: torch.Tensor) -> list[int]:
        """Accept the longest draft prefix greedy decoding agrees with; hide the rest of it from attention.
        Returns the tokens to emit: the accepted draft tokens, then the model's own next token (under the row's
        schema or grammar, if it has one: its best allowed token)."""
        draft = row.job.draft
        window = logits[logits.shape[0] - len(draft) - 1 :]
        predicted = window.argmax(dim=-1).tolist()
        if row.matcher is None:
            accepted = next((j for j, (p, d) in enumerate(zip(predicted, draft, strict=False)) if p != d), len(draft))
            following = predicted[accepted]
        else:
            accepted, following = _verify_under_mask(row.matcher, draft, window, predicted)
        if accepted < len(draft):
            attention[attention.shape[0] - (len(draft) - accepted) :] = 0
        row.fed.extend(draft[:accepted])
        row.job.draft_accepted = accepted
        return draft[:accepted] + [following]

    def _lookup_prefix(self, job: _Job) -> tuple[PrefixEntry | None, int]:
        if self.prefix_cache is None:
            return None, 0
        entry, length = self.prefix_cache.lookup(torch.tensor(job.prompt_ids), job.adapter, job.cache_salt)
        length = min(length, len(job.prompt_ids) - 1)  # the last prompt token must run: it yields the logits
        if entry is None or length <= 0:
            return None, 0
        self.prefix_cache.record_hit(length)
        job.cached_tokens = length
        return entry, length

    @staticmethod
    def _batch_cache(reused: list[tuple[PrefixEntry | None, int]], width: int) -> DynamicCache:
        """A batch cache holding each row's reused prefix right-aligned in `width` slots (zeros before it)."""
        cache = DynamicCache()
        first = next((entry for entry, _ in reused if entry is not None), None)
        if first is None or width == 0:
            return cache
        for layer, (keys0, values0) in enumerate(first.layers):
            heads, _, dim = keys0.shape
            keys = keys0.new_zeros((len(reused), heads, width, dim))
            values = values0.new_zeros((len(reused), values0.shape[0], width, values0.shape[2]))
            for i, (entry, length) in enumerate(reused):
                if entry is not None:
                    keys[i, :, width - length :] = entry.layers[layer][0][:, :length]
                    values[i, :, width - length :] = entry.layers[layer][1][:, :length]
            cache.update(keys, values, layer)
        return cache

    def _store_prefix(self, row: _Row, index: int, cache: DynamicCache, attention: torch.Tensor) -> None:
        """Keep a finished row's live keys/values so a later prompt that starts the same way can reuse them."""
        if self.prefix_cache is None or row.finish_reason == "abort" or row.job.params.n != 1:
            return
        live = attention[index].nonzero().squeeze(-1)
        if live.numel() != len(row.fed):  # cannot happen by construction; never store a misaligned entry
            log.warning("prefix cache: %d live positions for %d tokens; not stored", live.numel(), len(row.fed))
            return
        layers = tuple(
            (keys[index][:, live].clone(), values[index][:, live].clone())
            for keys, values in map(_keys_values, cache.layers)
        )
        self.prefix_cache.store(PrefixEntry(torch.tensor(row.fed), layers, row.job.adapter, row.job.cache_salt))

    @staticmethod
    def _generator(params: SamplingParams, k: int) -> torch.Generator | None:
        if params.greedy:
            return None
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed_for(params.seed, k))
        return generator

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = self._choose(logits, rows)
        for i, row in enumerate(rows):
            if row.job.params.logprobs is not None:
                row.logprobs.append(self._logprob(logits[i], tokens[i], row.job.params.logprobs))
        return tokens

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> SampledToken:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = logprobs.topk(top) if top else None
        alternatives = zip(best.indices.tolist(), best.values.tolist(), strict=True) if best is not None else ()
        return SampledToken(
            self._decode_text([token]),
            float(logprobs[token]),
            tuple((self._decode_text([t]), lp) for t, lp in alternatives),
        )

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            params = row.job.params
            if params.greedy and row.matcher is None:
                continue
            scores = logits[i].float()
            if row.matcher is not None:
                scores = mask_disallowed(scores, row.matcher)
            if params.greedy:
                tokens[i] = int(scores.argmax())
                continue
            probs = torch.softmax(scores / params.temperature, dim=-1)
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

    def _text(self, row: _Row) -> str:
        return row.text if row.text is not None else self._decode_text(row.token_ids, skip_special_tokens=True)

    def _stream(self, row: _Row, final: bool = False) -> None:
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

    def _finish(self, job: _Job, job_rows: list[_Row]) -> None:
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
        _resolve(job.loop, job.future, generation)


def _verify_under_mask(
    matcher: LLMatcher, draft: list[int], window: torch.Tensor, predicted: list[int]
) -> tuple[int, int]:
    """How much of a draft greedy decoding under a grammar agrees with, and its token after that. Under the mask
    greedy decoding takes the best token the matcher allows: the model's own choice where it is allowed (no mask
    to compute), the masked choice elsewhere, which a draft written under the same grammar often is too."""
    probe = matcher.deep_copy()  # the row's matcher takes the emitted tokens afterwards, as for any token
    for j, token in enumerate(draft):
        if predicted[j] == token and probe.validate_tokens([token]) == 1:
            choice = token
        else:
            choice = int(mask_disallowed(window[j].float(), probe).argmax())
        if choice != token:
            return j, choice
        probe.consume_token(token)
    # after a draft that ends its turn, the token chosen here is never used
    return len(draft), int(mask_disallowed(window[len(draft)].float(), probe).argmax())


def _stack(
    cache_a: DynamicCache, attention_a: torch.Tensor, cache_b: DynamicCache, attention_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """One batch of two: each cache right-aligned in the wider one's width, the gap masked out on the left."""
    width = max(attention_a.shape[1], attention_b.shape[1])

    def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = width - shape[dim]
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    cache = DynamicCache()
    for layer, (a, b) in enumerate(zip(cache_a.layers, cache_b.layers, strict=True)):
        (keys_a, values_a), (keys_b, values_b) = _keys_values(a), _keys_values(b)
        keys = torch.cat([left_pad(keys_a, 2), left_pad(keys_b, 2)])
        values = torch.cat([left_pad(values_a, 2), left_pad(values_b, 2)])
        cache.update(keys, values, layer)
    return cache, torch.cat([left_pad(attention_a, 1), left_pad(attention_b, 1)])


def _keys_values(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values. Every layer of a filled DynamicCache over the models served here has both
    (no linear-attention layers)."""
    assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _sample_numbers(jobs: list[_Job]) -> list[int]:
    """For every row, which of its job's n samples it is (seeds differ per sample)."""
    return [k for job in jobs for k in range(job.params.n)]
