"""The CPU engine at llama.cpp's speed: a managed `llama-server` subprocess reading the embedded GGUF as it is.

Why a subprocess and not in-process bindings: llama-server already is the scheduler this protocol needs (continuous
batching over slots, a prompt cache per slot, `n` completions sharing one prefill, per-request LoRA scales,
cancellation when the client disconnects), it runs its decoding threads outside Python's GIL, and it is built
from the same pinned source as the LoRA converter (llamacpp_build.py). The bindings would leave the scheduling to us.

What maps where:
- prompts: token ids from `encode_chat` (the Hugging Face tokenizer and chat template of the converted checkpoint,
  the same as every engine), sent as ids to `/completion`, so the prompt is the same on every backend;
- `SamplingParams`: greedy is temperature 0; top_k and min_p are switched off (llama.cpp's defaults of 40 and 0.05
  would change the distribution the other engines sample); `n` is llama.cpp's `n_cmpl` (one prefill, and completion
  i gets seed + i, as `seed_for`); `stop` strings are cut from the text as on the other engines; `json_schema` goes to
  llama.cpp's own schema-to-grammar converter; `logprobs` are llama.cpp's pre-sampling probabilities;
- not supported, by design of this backend: the Lark `grammar` of tool_choice "auto" (llama.cpp would need
  llguidance, which needs crates.io at build time): those requests decode freely, which the protocol allows;
  `draft` as such: llama-server runs prompt-lookup speculative decoding (`--spec-type ngram-simple`), which proposes
  the previous answer from the refine round's own prompt and verifies it in batches, and its slot prompt cache
  reuses the previous round's prompt;
  `cache_salt` (llama.cpp keys its cache on tokens only; prompts of different tenants can share a prefix's KV);
  and its host-RAM prompt cache is off (it keys saved KV on tokens alone, so a request could resume KV that an
  adapter computed; nor does it keep the prompts of `n` > 1 requests, whose child slots clear theirs on release and
  take over the parent's before it is saved); each slot's own cache stays, cleared by llama-server when the slot's
  adapter changes;
- adapters: a peft LoRA directory is converted to a GGUF LoRA (llama.cpp's `convert_lora_to_gguf.py`) at load;
  llama-server only loads LoRA files at start-up, so loading or unloading one starts a new server with the new set
  (a few seconds) and retires the old one when its last request ends: requests in flight are not lost. A request
  applies its adapter at scale 1 and every other one at 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
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
    context_length,
    encode_chat,
    eos_token_ids,
    model_configs,
    seed_for,
)
from server.engine.dtypes import cpu_flags
from server.engine.llamacpp_build import server_binary, source_dir

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # else one INFO line per loopback call to llama-server

# The shared KV pool llama-server allocates up front (Qwen2.5-0.5B: 12 KiB a token, 0.75 GiB for this); one sequence
# may still use the model's whole context.
KV_POOL_TOKENS = 65536
START_TIMEOUT = 120.0  # seconds for llama-server to load the model and answer /health
_SEED_SPACE = 2**32 - 1  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
_FINISH: dict[str, FinishReason] = {"eos": "stop", "word": "stop", "limit": "length"}


def server_args(max_model_len: int, slots: int, threads: int | None = None, *, prompt_lookup: bool = True) -> list[str]:
    """llama-server's settings for this engine (the benchmark starts llama.cpp's own server with the same)."""
    threads_arg = str(threads or os.cpu_count() or 1)
    slots = max(1, slots)
    return [
        "--parallel", str(slots),
        "--kv-unified",  # one KV pool: any slot may use the whole context, as our other engines allow
        "--ctx-size", str(min(max_model_len * slots, max(max_model_len, KV_POOL_TOKENS))),
        "--threads", threads_arg,
        "--threads-batch", threads_arg,
        "--no-webui",
        "--cache-ram", "0",  # seen without: base requests answering with an adapter's distribution
        "--lora-init-without-apply",  # a request names the adapter it wants; others stay at scale 0
        # Prompt lookup: n-grams of the context proposed as drafts and verified in one batch. A refine round
        # repeating the previous answer (which is in its prompt) is verified instead of decoded token by token.
        # Lookup on the last 4 tokens, not llama.cpp's 12: drafting starts 8 tokens sooner in a short tool call
        # (a 47-token repeat: 45 of 48 draft tokens accepted and 39 tok/s, against 40 of 48 and 23-29 tok/s).
        # Off where nothing repeats (sampling at temperature 1): every draft is then a wasted batch (`prompt_lookup`).
        *(["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4"] if prompt_lookup else []),
        # On an AMX CPU (a Sapphire Rapids VM here) this build's AMX matmul for the repacked Q4_K weights segfaults
        # at the first batch; without repacking the AVX-512 kernels run instead.
        *(["--no-repack"] if "amx_int8" in cpu_flags() else []),
    ]  # fmt: skip


def request_body(
    ids: list[int], params: SamplingParams, *, adapter: str | None = None, names: Sequence[str] = (), cache: bool = True
) -> dict[str, Any]:
    """The /completion body for a request (`names`: the server's LoRA adapters in id order)."""
    body: dict[str, Any] = {
        "prompt": ids,
        "n_predict": params.max_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_p": params.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "n_cmpl": params.n,
        "stop": list(params.stop),
        "cache_prompt": cache,
        "return_tokens": True,
        "lora": [{"id": i, "scale": 1.0 if name == adapter else 0.0} for i, name in enumerate(names)],
    }
    if params.seed is not None:
        body["seed"] = seed_for(params.seed) % _SEED_SPACE
    if params.json_schema is not None:
        body["json_schema"] = params.json_schema
    elif params.grammar is not None:
        log.debug("llama.cpp engine: Lark grammars are not supported; decoding freely")
    if params.logprobs is not None:
        body["n_probs"] = max(1, params.logprobs)
    return body


class _Server:
    """One llama-server process with a fixed set of LoRA files; retired when a new set replaces it."""

    def __init__(
        self, binary: Path, gguf: Path, loras: Mapping[str, Path], args: Sequence[str], log_path: Path
    ) -> None:
        self.names = list(loras)  # llama-server numbers the LoRA files in the order given
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), *args]
        for lora in loras.values():
            command += ["--lora", str(lora)]
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.active = 0
        self.retired = False
        self._lock = threading.Lock()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(f"llama-server exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise EngineError(f"llama-server did not become ready in {START_TIMEOUT:.0f} s; see {self.log_path}")

    def enter(self) -> bool:
        """Count a request in; False once retired (the caller takes the engine's current server instead)."""
        with self._lock:
            if self.retired:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            done = self.retired and self.active == 0
        if done:
            self.stop()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            done = self.active == 0
        if done:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class LlamaCppEngine:
    """Engine protocol implementation over llama-server; `model_dir` is the converted checkpoint (tokenizer and
    chat template), `gguf` the weights llama.cpp runs."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        gguf: str | Path,
        model_name: str | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        num_threads: int | None = None,
        prefix_cache_tokens: int = 65536,
        dtype: str | None = None,  # accepted for the CLI's sake: the GGUF's own types are what llama.cpp runs
        prompt_lookup: bool = True,
        progress: bool = True,
    ) -> None:
        del dtype
        self.model_dir = Path(model_dir)
        self.gguf = Path(gguf)
        self.model_name = model_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        configs = model_configs(self.model_dir)
        self.max_model_len = context_length(configs[-1], max_model_len)
        self._eos_ids = eos_token_ids(self.tokenizer, configs)
        self.cache_prompt = prefix_cache_tokens > 0
        self._args = server_args(self.max_model_len, max_batch_size, num_threads, prompt_lookup=prompt_lookup)
        self._binary = server_binary(progress=progress)
        self._work = Path(tempfile.mkdtemp(prefix="toolace-llamacpp-"))
        self._adapters: dict[str, Path] = {}  # served name -> GGUF LoRA file, in llama-server's id order
        self._swap = threading.Lock()
        self._server = self._start()

    def _start(self) -> _Server:
        server = _Server(self._binary, self.gguf, self._adapters, self._args, self._work / "server.log")
        server.wait_ready()
        return server

    @property
    def url(self) -> str:
        """The current llama-server's address (its /slots and /metrics are there too)."""
        return self._server.url

    # ---- Engine protocol ----

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
        server = self._server
        while not server.enter():  # retired between the read and the count: a newer one is in place
            server = self._server
        try:
            if adapter is not None and adapter not in server.names:
                raise EngineError(f"adapter {adapter!r} is not loaded")
            body = request_body(ids, params, adapter=adapter, names=server.names, cache=self.cache_prompt)
            streamed = on_text if params.n == 1 else None
            # Plain HTTP on loopback: verify=False skips building a TLS context nobody uses (33 ms per client here).
            async with httpx.AsyncClient(base_url=server.url, timeout=None, verify=False) as client:
                results = await self._stream(client, body, params.n, streamed)
        finally:
            server.leave()
        timings = [r.get("timings", {}) for r in results]
        return Generation(
            prompt_tokens=len(ids),
            completions=tuple(self._completion(r, params) for r in results),
            cached_tokens=int(timings[0].get("cache_n", 0)),
            draft_tokens=sum(int(t.get("draft_n", 0)) for t in timings),
            draft_accepted_tokens=sum(int(t.get("draft_n_accepted", 0)) for t in timings),
        )

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def load_adapter(self, name: str, path: str | Path) -> None:
        gguf = await asyncio.to_thread(self._convert_lora, Path(path))
        await asyncio.to_thread(self._restart_with, {**self._adapters, name: gguf})

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise EngineError(f"adapter {name!r} is not loaded")
        await asyncio.to_thread(self._restart_with, {k: v for k, v in self._adapters.items() if k != name})

    async def close(self) -> None:
        await asyncio.to_thread(self._server.stop)
        shutil.rmtree(self._work, ignore_errors=True)

    # ---- requests ----

    async def _stream(
        self, client: httpx.AsyncClient, body: dict[str, Any], n: int, on_text: Callable[[str], None] | None
    ) -> list[dict[str, Any]]:
        """Always streamed, even when nobody reads the pieces: llama-server notices a client that went away (a
        cancelled request) when a write fails, and frees the slot. Returns the n final results, in order."""
        content: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        probs: list[list[Any]] = [[] for _ in range(n)]
        final: dict[int, dict[str, Any]] = {}
        async with client.stream("POST", "/completion", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            async for event in _events(response.aiter_lines()):
                i = int(event.get("index", 0))
                content[i].append(event.get("content", ""))
                tokens[i] += event.get("tokens", [])
                probs[i] += event.get("completion_probabilities", [])
                if on_text is not None and event.get("content"):
                    on_text(event["content"])
                if event.get("stop"):
                    final[i] = {**event, "content": "".join(content[i]), "tokens": tokens[i]}
                    final[i]["completion_probabilities"] = probs[i]
        if len(final) != n:
            raise EngineError(f"llama-server ended the stream with {len(final)} of {n} completions")
        return [final[i] for i in range(n)]

    def _completion(self, result: Mapping[str, Any], params: SamplingParams) -> Completion:
        token_ids = list(result.get("tokens", []))
        stop_token_id = None
        if result.get("stop_type") == "eos" and token_ids and token_ids[-1] in self._eos_ids:
            stop_token_id = token_ids.pop()
        logprobs = None
        if params.logprobs is not None:
            logprobs = tuple(
                SampledToken(
                    token=p["token"],
                    logprob=float(p["logprob"]),
                    top=tuple((t["token"], float(t["logprob"])) for t in p.get("top_logprobs", [])[: params.logprobs]),
                )
                for p in result.get("completion_probabilities", [])[: len(token_ids)]
            )
        return Completion(
            text=result.get("content", ""),
            token_ids=tuple(token_ids),
            finish_reason=_FINISH.get(result.get("stop_type", ""), "abort"),
            stop_token_id=stop_token_id,
            logprobs=logprobs,
        )

    # ---- adapters ----

    def _convert_lora(self, peft_dir: Path) -> Path:
        """A peft LoRA directory as a GGUF LoRA file (cached by the weights' checksum)."""
        weights = peft_dir / "adapter_model.safetensors"
        if not (weights.is_file() and (peft_dir / "adapter_config.json").is_file()):
            raise EngineError(f"{peft_dir} holds no peft LoRA (adapter_config.json, adapter_model.safetensors)")
        digest = hashlib.sha256(weights.read_bytes() + (peft_dir / "adapter_config.json").read_bytes()).hexdigest()
        out = self._work / f"lora-{digest[:16]}.gguf"
        if out.is_file():
            return out
        script = source_dir() / "convert_lora_to_gguf.py"
        if not script.is_file():
            raise EngineError(f"cannot convert adapters: {script} is missing (python -m server.engine.llamacpp_build)")
        command = [sys.executable, str(script), "--base", str(self.model_dir), "--outfile", str(out), str(peft_dir)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"converting the adapter to GGUF failed: {done.stderr.strip()[-500:]}")
        return out

    def _restart_with(self, adapters: dict[str, Path]) -> None:
        with self._swap:
            previous, previous_adapters = self._server, self._adapters
            self._adapters = adapters
            try:
                self._server = self._start()
            except Exception:
                self._adapters = previous_adapters
                raise
            previous.retire()


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def _raise_for(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    raise EngineError(f"llama-server refused the request ({response.status_code}): {message}")
