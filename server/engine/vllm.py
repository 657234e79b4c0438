"""The GPU production engine: vLLM's in-process async engine (`AsyncLLM`) behind the same `Engine` protocol.

vLLM runs the model in its own processes (EngineCore and workers, spawned) and talks to them over ZeroMQ; the part
that lives in this process (request intake, detokenization) is bound to one asyncio event loop. That loop is ours:
a dedicated thread runs it, and `generate` hands requests over with `run_coroutine_threadsafe`. So the engine works
from any caller loop, including one `asyncio.run` per call (tests, the training package), like the transformers
backend, and the server's loop only ever waits on futures.

What maps where:
- prompts: token ids from `encode_chat`, which renders the chat template with the same Hugging Face tokenizer and
  the same calls as the transformers backend, so both engines see identical prompts;
- `SamplingParams`: greedy is temperature 0; `n`, `seed`, `stop`, `top_p` pass through; the end-of-turn tokens are
  the same set the transformers backend stops on; `json_schema` (and the `grammar` of tool_choice "auto", Lark)
  becomes vLLM structured outputs on the `guidance` backend (llguidance, compact JSON): the grammar the
  transformers backend builds;
- `cache_salt` goes on the prompt (vLLM's prefix cache keys blocks on it), `cached_tokens` is vLLM's
  `num_cached_tokens` (whole KV blocks only: 16 tokens on GPUs, 128 on CPUs);
- `draft` is ignored: the refine round's prompt repeats the previous round's prompt, and vLLM's automatic prefix
  caching reuses its KV. Verifying the previous answer in one pass is what n-gram speculative decoding does
  (`speculative_config={"method": "ngram", ...}`): the refine prompt contains the previous answer, so prompt
  lookup proposes it. It is exact for greedy decoding and may be turned on with that option;
- adapters: one `LoRARequest(name, int_id, path)` per request; ids are never reused, so a re-loaded adapter never
  hits a stale cache entry. A request naming a LoRA path that fails to load kills vLLM's engine core, so adapters
  are loaded (and fail) in `load_adapter`, and requests only name loaded ones;
- cancellation: cancelling the awaiting coroutine cancels the request's task on the engine loop, and vLLM aborts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoTokenizer

from server.engine.base import (
    ChatMessage,
    Completion,
    EngineError,
    FinishReason,
    Generation,
    SampledToken,
    SamplingParams,
    checked_prompt_ids,
    encode_chat,
    eos_token_ids,
    model_configs,
    seed_for,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_LORAS = 4  # adapters in one batch (GPU slots); matches the server's --max-loaded-adapters default
DEFAULT_MAX_LORA_RANK = 64  # matches the server's --max-lora-rank default; vLLM accepts 1, 8, 16, 32, 64, 128...
# On CPUs vLLM sizes its KV cache from this variable (whole GiB), not from gpu_memory_utilization.
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# vLLM's default (5 s) can end in a kill while a worker still tears down (~4 s on 2 CPU cores).
SHUTDOWN_TIMEOUT = 30.0


class VllmEngine:
    """Engine protocol implementation over vLLM; `model_dir` is a Hugging Face checkpoint directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        max_batch_size: int | None = None,
        prefix_cache_tokens: int | None = None,
        enable_prefix_caching: bool | None = None,
        enable_lora: bool = True,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        max_cpu_loras: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        speculative_config: Mapping[str, Any] | None = None,
        structured_outputs_backend: str = "guidance",
        seed: int = 0,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """`max_batch_size` is vLLM's max_num_seqs. Prefix caching is on unless `enable_prefix_caching` is False
        or, when that is not given, `prefix_cache_tokens` (the transformers backend's knob) is 0. `engine_args`
        adds or overrides any other `AsyncEngineArgs` field."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._eos_ids = eos_token_ids(self.tokenizer, model_configs(self.model_dir))
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        if enable_prefix_caching is None:
            enable_prefix_caching = prefix_cache_tokens is None or prefix_cache_tokens > 0
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "served_model_name": self.model_name,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": enable_prefix_caching,
            "enable_lora": enable_lora,
            "seed": seed,
            # Same grammar engine and compact JSON as the transformers backend (server/engine/constrained.py).
            "structured_outputs_config": {"backend": structured_outputs_backend, "disable_any_whitespace": True},
            "disable_log_stats": True,
            **({"max_num_seqs": max_batch_size} if max_batch_size else {}),
            **(_lora_args(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else {}),
            **({"speculative_config": dict(speculative_config)} if speculative_config else {}),
            **(engine_args or {}),
        }
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        self._lora_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()  # running requests, on the engine loop
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="toolace-vllm", daemon=True)
        self._llm = self._start(AsyncEngineArgs(**args))
        self.max_model_len = int(self._llm.model_config.max_model_len)

    def _start(self, args: Any) -> Any:
        """vLLM's engine, built on the engine loop (started here), so that its output handler task lives there."""
        from vllm.v1.engine.async_llm import AsyncLLM

        async def build() -> Any:
            return AsyncLLM.from_engine_args(args)

        os.environ.setdefault(CPU_KV_CACHE_ENV, "1")  # vLLM's CPU default would take a large share of RAM
        self._thread.start()
        try:
            llm = self._run_on_loop(build()).result()
        except BaseException:
            self._stop_loop()
            raise
        lora = f"on (max rank {self.max_lora_rank}, {args.max_loras} per batch)" if args.enable_lora else "off"
        prefix = "on" if args.enable_prefix_caching else "off"
        details = f"max_model_len {llm.model_config.max_model_len}, prefix caching {prefix}"
        log.info("vLLM engine ready: %s, %s, LoRA %s", self.model_name, details, lora)
        return llm

    # ---- public API (caller's event loop) ----

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
        if self._closed:
            raise EngineError("the engine is shutting down")
        ids = checked_prompt_ids(prompt, params, self.max_model_len, self.encode_chat)
        lora = None
        if adapter is not None:
            lora = self._adapters.get(adapter)
            if lora is None:
                raise EngineError(f"adapter {adapter!r} is not loaded")
        stream: Callable[[str], None] | None = None
        if on_text is not None and params.n == 1:
            caller = asyncio.get_running_loop()

            def stream(piece: str) -> None:
                caller.call_soon_threadsafe(on_text, piece)

        sampling = self._sampling_params(params, streaming=stream is not None)
        future = self._run_on_loop(self._generate(ids, sampling, lora, cache_salt, stream))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # cancels the task on the engine loop, and vLLM aborts the request
            raise

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def num_unfinished_requests(self) -> int:
        """Requests vLLM is still running or holding (an aborted request leaves at once)."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft LoRA directory under `name` (replacing an adapter of that name); EngineError if vLLM
        cannot load it."""
        from vllm.lora.request import LoRARequest

        if self._closed:
            raise EngineError("the engine is shutting down")
        if not self.enable_lora:
            raise EngineError("this engine was started without LoRA support (enable_lora=False)")
        path = Path(path).resolve()
        try:
            rank = int(json.loads((path / "adapter_config.json").read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{path} is not a LoRA adapter directory ({exc})") from exc
        if rank > self.max_lora_rank:
            raise EngineError(
                f"the adapter's rank is {rank}; this engine was started with max_lora_rank {self.max_lora_rank}"
            )
        request = LoRARequest(name, next(self._lora_ids), str(path))
        try:
            await asyncio.wrap_future(self._run_on_loop(self._llm.add_lora(request)))
        except Exception as exc:  # vLLM reports a worker's failure as a plain Exception
            raise EngineError(f"vLLM could not load adapter {name!r}: {exc}") from exc
        previous = self._adapters.get(name)
        self._adapters[name] = request
        if previous is not None:
            await asyncio.wrap_future(self._run_on_loop(self._llm.remove_lora(previous.lora_int_id)))

    async def unload_adapter(self, name: str) -> None:
        if self._closed:
            raise EngineError("the engine is shutting down")
        request = self._adapters.pop(name, None)
        if request is None:
            raise EngineError(f"adapter {name!r} is not loaded")
        await asyncio.wrap_future(self._run_on_loop(self._llm.remove_lora(request.lora_int_id)))

    async def close(self) -> None:
        """Abort running requests (their callers get EngineError), stop vLLM's processes, end the loop thread."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    # ---- engine loop side ----

    def _run_on_loop(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _sampling_params(self, params: SamplingParams, streaming: bool) -> Any:
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        structured = None
        if params.json_schema is not None:
            structured = StructuredOutputsParams(json=dict(params.json_schema))
        elif params.grammar is not None:  # Lark on the guidance backend: the grammar the transformers backend uses
            structured = StructuredOutputsParams(grammar=params.grammar)
        return VllmSamplingParams(
            n=params.n,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            seed=None if params.seed is None else seed_for(params.seed),
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=sorted(self._eos_ids),
            structured_outputs=structured,
            logprobs=params.logprobs,
            # Without a listener, one output at the end: no per-token work in this process.
            output_kind=RequestOutputKind.CUMULATIVE if streaming else RequestOutputKind.FINAL_ONLY,
        )

    async def _generate(
        self,
        ids: list[int],
        sampling: Any,
        lora: Any,
        cache_salt: str | None,
        on_text: Callable[[str], None] | None,
    ) -> Generation:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        final, streamed = None, 0
        try:
            request_id = f"toolace-{id(task):x}-{next(_request_numbers)}"
            async for output in self._llm.generate(
                tokens_input(ids, cache_salt=cache_salt), sampling, request_id, lora_request=lora
            ):
                final = output
                if on_text is not None:
                    text = output.outputs[0].text  # cumulative; vLLM holds back what a stop string may claim
                    if len(text) > streamed:
                        on_text(text[streamed:])
                        streamed = len(text)
        except VLLMClientError as exc:  # validation: a schema the grammar engine refuses, a bad token id...
            raise EngineError(str(exc)) from exc
        except asyncio.CancelledError:
            if self._closed:
                raise EngineError("the engine is shutting down") from None
            raise
        finally:
            self._tasks.discard(task)
        assert final is not None and final.finished
        return self._generation(ids, final, sampling.logprobs)

    def _generation(self, ids: list[int], output: Any, top: int | None) -> Generation:
        completions = []
        for sample in sorted(output.outputs, key=lambda c: c.index):
            token_ids = list(sample.token_ids)
            stop_token_id = None
            # vLLM keeps the token that ended the turn; the protocol reports it apart (see Completion.as_draft).
            if sample.finish_reason == "stop" and token_ids and token_ids[-1] in self._eos_ids:
                stop_token_id = token_ids.pop()
            reason: FinishReason = sample.finish_reason if sample.finish_reason in ("length", "abort") else "stop"
            logprobs = None
            if sample.logprobs is not None:  # one {token id: Logprob} per output token, the sampled one included
                logprobs = tuple(
                    _token_logprob(t, entry, top or 0) for t, entry in zip(token_ids, sample.logprobs, strict=False)
                )
            completions.append(Completion(sample.text, tuple(token_ids), reason, stop_token_id, logprobs))
        return Generation(
            prompt_tokens=len(ids),
            completions=tuple(completions),
            cached_tokens=output.num_cached_tokens or 0,
        )

    def _shutdown(self) -> None:
        """Runs on a helper thread: cancel the running requests, shut vLLM down, stop the loop."""

        async def stop() -> None:
            for task in list(self._tasks):
                task.cancel()  # each aborts its vLLM request on the way out
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=10)
            # Drop our reference too: AsyncLLM.__del__ shuts down again, which must not wait for interpreter exit
            # (its module globals are gone by then).
            llm, self._llm = self._llm, None
            llm.shutdown(timeout=SHUTDOWN_TIMEOUT)

        try:
            self._run_on_loop(stop()).result(timeout=SHUTDOWN_TIMEOUT + 30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()


_request_numbers = itertools.count()
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_args(max_loras: int, max_lora_rank: int, max_cpu_loras: int | None) -> dict[str, Any]:
    cpu_loras = max(max_cpu_loras or max_loras, max_loras)
    return {"max_loras": max_loras, "max_lora_rank": _vllm_rank(max_lora_rank), "max_cpu_loras": cpu_loras}


def _vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (adapters are still refused above `rank`)."""
    return next((r for r in _VLLM_RANKS if r >= rank), rank)


def _token_logprob(token_id: int, entry: Mapping[int, Any], top: int) -> SampledToken:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} as a SampledToken: the
    `top` most likely (rank 1..top) plus the sampled token, which may rank lower."""
    chosen = entry[token_id]
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
    alternatives = tuple((lp.decoded_token or "", lp.logprob) for lp in ranked)
    return SampledToken(chosen.decoded_token or "", chosen.logprob, alternatives)
