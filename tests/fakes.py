"""One fake engine for tests of pure logic (training's selection and refine data, the server's serving layer): the
whole `Engine` protocol, answers from a script instead of a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.engine.base import Completion, Generation, SampledToken, SamplingParams

Script = Callable[[list[dict[str, Any]], SamplingParams], list[str]]


class ScriptedEngine:
    """An Engine whose answers come from `script(messages, params) -> list of texts` (one per sample). Every call
    is recorded as (messages, params, adapter); a prompt of more than `max_model_len` messages' worth of tokens is not
    modelled: each prompt is one token, a handle back to its messages. Each answer character is one token."""

    model_name = "scripted"

    def __init__(self, script: Script, max_model_len: int = 100_000, piece: int = 4) -> None:
        self.script = script
        self.max_model_len = max_model_len
        self.piece = piece  # characters per `on_text` call, as an engine streams tokens
        self.calls: list[tuple[list[dict[str, Any]], SamplingParams, str | None]] = []
        self._adapters: dict[str, str] = {}
        self._prompts: dict[int, list[dict[str, Any]]] = {}

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> list[int]:
        key = len(self._prompts) + 1
        self._prompts[key] = [dict(m) for m in messages]
        return [key]

    async def generate(
        self,
        prompt: Sequence[Any],
        params: SamplingParams,
        adapter: str | None = None,
        draft: Sequence[int] | None = None,
        cache_salt: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        messages = self._prompts[prompt[0]] if isinstance(prompt[0], int) else [dict(m) for m in prompt]
        self.calls.append((messages, params, adapter))
        texts = self.script(messages, params)
        assert len(texts) == params.n, (texts, params.n)
        if on_text is not None:
            for i in range(0, len(texts[0]), self.piece):
                on_text(texts[0][i : i + self.piece])
        return Generation(1, tuple(self._completion(t, params) for t in texts))

    @staticmethod
    def _completion(text: str, params: SamplingParams) -> Completion:
        """One token per character; with logprobs, each character at -0.5 and `params.logprobs` alternatives."""
        logprobs = None
        if params.logprobs is not None:
            top = tuple((f"alt{i}", -1.0 - i) for i in range(params.logprobs))
            logprobs = tuple(SampledToken(ch, -0.5, top) for ch in text)
        return Completion(text, tuple(range(len(text))), "stop", logprobs=logprobs)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def load_adapter(self, name: str, path: str | Path) -> None:
        self._adapters[name] = str(path)

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    async def close(self) -> None:
        pass
