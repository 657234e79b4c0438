"""Fixtures for the training tests: the scripted engine (tests/fakes.py, no model) and small samples."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.toolcalls import ToolCall
from tests.fakes import ScriptedEngine
from training.data import GroundTruthCall, Sample


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
