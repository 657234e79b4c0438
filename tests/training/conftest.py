"""Fixtures for the training tests: a scripted engine (no model) and small samples."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from server.engine.base import Completion, Generation, SamplingParams
from server.toolcalls import ToolCall
from training.data import GroundTruthCall, Sample


class ScriptedEngine:
    """An Engine whose answers come from `script(messages, params) -> list of texts` (one per sample)."""

    model_name = "scripted"
    max_model_len = 100_000

    def __init__(self, script: Callable[[list[dict[str, Any]], SamplingParams], list[str]]) -> None:
        self.script = script
        self.calls: list[tuple[list[dict[str, Any]], SamplingParams, str | None]] = []
        self._adapters: dict[str, str] = {}
        self._prompts: dict[int, list[dict[str, Any]]] = {}

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> list[int]:
        key = len(self._prompts) + 1
        self._prompts[key] = [dict(m) for m in messages]
        return [key]  # a handle back to the messages

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        adapter: str | None = None,
        draft: Any = None,
        cache_salt: Any = None,
    ) -> Generation:
        messages = self._prompts[prompt[0]]
        self.calls.append((messages, params, adapter))
        texts = self.script(messages, params)
        assert len(texts) == params.n
        return Generation(1, tuple(Completion(t, (1,), "stop") for t in texts))

    async def load_adapter(self, name: str, path: Any) -> None:
        self._adapters[name] = str(path)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def close(self) -> None:
        pass


def weather_sample(sample_id: str = "s1", city: str = "Paris") -> Sample:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    truth = (GroundTruthCall.exact(ToolCall("get_weather", {"city": city})),)
    return Sample(sample_id, "test", ({"role": "user", "content": f"Weather in {city}?"},), (tool,), truth)


@pytest.fixture
def scripted() -> type[ScriptedEngine]:
    return ScriptedEngine


@pytest.fixture
def make_sample() -> Callable[..., Sample]:
    return weather_sample
