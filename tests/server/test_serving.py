"""The serving layer in-process, on the scripted engine (tests/fakes.py): the app of server/api.py over a ChatService,
called through the official openai client and httpx on an ASGI transport. No model, no subprocess: validation,
planning, the refine loop, chunk assembly and error mapping, without a model. The subprocess tests (test_api.py and
the others) cover the same routes with a real model and engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from server.api import create_app
from server.config import ServingConfig
from server.engine.base import EngineError, SamplingParams
from server.prompts import REFINE_PROMPT
from server.serving import ChatService
from tests.conftest import assert_error
from tests.fakes import ScriptedEngine
from tests.samples import HELLO, WEATHER_TOOL

MODEL = "scripted"
PARIS, PARI = "[get_weather(city='Paris')]", "[get_weather(city='Pari')]"
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


def rounds(*answers: str) -> Callable[[list[dict[str, Any]], SamplingParams], list[str]]:
    """A script answering its r-th call with answers[r] (the last one after that): one choice, round after round."""
    calls = 0

    def script(messages: list[dict[str, Any]], params: SamplingParams) -> list[str]:
        nonlocal calls
        calls += 1
        return [answers[min(calls - 1, len(answers) - 1)]] * params.n

    return script


def call(engine: ScriptedEngine, body: dict[str, Any], route: str = "chat/completions", **kw: Any) -> httpx.Response:
    app = create_app(ChatService(engine, ServingConfig(served_model_name=MODEL)))

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test/v1") as client:
            return await client.post(route, json={"model": MODEL, **body}, **kw)

    return asyncio.run(send())


def test_adaptive_refinement_stops_when_two_answers_agree() -> None:
    engine = ScriptedEngine(rounds(PARI, PARIS, PARIS, PARI))
    body = {"messages": WEATHER, "tools": [WEATHER_TOOL], "refine": "adaptive", "return_refinement_history": True}
    data = call(engine, body).json()
    assert data["refinement"] == {
        "mode": "adaptive",
        "iterations": 2,
        "stop_reason": "converged",
        "answers": [PARI, PARIS, PARIS],
    }
    assert json.loads(data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    # a refine round's context: the question, the previous answer, the refine prompt (Algorithm 1)
    assert [[m["content"] for m in messages[-3:]] for messages, _, _ in engine.calls[1:]] == [
        [WEATHER[0]["content"], PARI, REFINE_PROMPT],
        [WEATHER[0]["content"], PARIS, REFINE_PROMPT],
    ]


@pytest.mark.parametrize(("mode", "final"), [("vanilla", PARI), ("self_consistency", PARIS)])
def test_fixed_round_modes_run_every_round(mode: str, final: str) -> None:
    engine = ScriptedEngine(rounds(PARI, PARIS, PARIS, PARI))
    body = {"messages": WEATHER, "tools": [WEATHER_TOOL], "refine": mode, "max_refine_iterations": 3}
    data = call(engine, body).json()
    assert data["refinement"] == {"mode": mode, "iterations": 3, "stop_reason": "max_iterations"}
    assert len(engine.calls) == 4
    arguments = data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"city": final.split("'")[1]}  # vanilla: the last; self-consistency: the majority


def test_a_call_to_an_unoffered_tool_comes_back_as_text() -> None:
    engine = ScriptedEngine(rounds("[get_time(city='Paris')]"))
    data = call(engine, {"messages": WEATHER, "tools": [WEATHER_TOOL]}).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls")
    assert choice["message"]["content"] == "[get_time(city='Paris')]"


def test_parallel_tool_calls_false_keeps_one_call() -> None:
    engine = ScriptedEngine(rounds("[get_weather(city='Paris'), get_weather(city='Rome')]"))
    body = {"messages": WEATHER, "tools": [WEATHER_TOOL], "parallel_tool_calls": False}
    calls = call(engine, body).json()["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}]


def test_n_choices_get_seeds_of_their_own() -> None:
    engine = ScriptedEngine(lambda messages, params: [f"answer {params.seed}"])
    data = call(engine, {"messages": HELLO, "n": 3, "seed": 41, "temperature": 1.0}).json()
    assert [c["message"]["content"] for c in data["choices"]] == ["answer 41", "answer 42", "answer 43"]
    assert data["usage"]["completion_tokens"] == 3 * len("answer 41")


def test_streamed_tokens_arrive_as_the_engine_makes_them() -> None:
    engine = ScriptedEngine(rounds("Hello there, friend."), piece=3)

    async def stream() -> list[str]:
        app = create_app(ChatService(engine, ServingConfig(served_model_name=MODEL)))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app))
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
        chunks = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)  # type: ignore[arg-type]
        return [c.choices[0].delta.content or "" async for c in chunks if c.choices]

    deltas = asyncio.run(stream())
    assert "".join(deltas) == "Hello there, friend."
    assert [d for d in deltas if d][:3] == ["Hel", "lo ", "the"]  # the engine's pieces, not the answer at once


def test_streamed_refinement_reports_rounds_then_the_calls() -> None:
    engine = ScriptedEngine(rounds(PARI, PARIS, PARIS))
    body = {"messages": WEATHER, "tools": [WEATHER_TOOL], "refine": "adaptive", "stream": True}
    text = call(engine, body).text
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["refinement_round"]["round"] for c in chunks if "refinement_round" in c] == [0, 1, 2]
    arguments = "".join(
        call["function"].get("arguments", "")
        for c in chunks
        for choice in c["choices"]
        for call in choice["delta"].get("tool_calls", [])
    )
    assert json.loads(arguments) == {"city": "Paris"}
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert chunks[-1]["refinement"] == {"mode": "adaptive", "iterations": 2, "stop_reason": "converged"}


def test_the_responses_api_runs_the_same_loop() -> None:
    engine = ScriptedEngine(rounds(PARI, PARIS, PARIS))
    tool = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]
    body = {"input": "Weather in Paris?", "tools": [tool], "refine": "adaptive"}
    data = call(engine, body, route="responses").json()
    assert data["refinement"]["iterations"] == 2
    assert [(item["type"], json.loads(item["arguments"])) for item in data["output"]] == [
        ("function_call", {"city": "Paris"})
    ]


def response_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")]


def test_the_responses_api_returns_the_output_texts_logprobs_when_asked() -> None:
    engine = ScriptedEngine(rounds("Hi!"))
    body = {"input": "Say hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    (part,) = call(engine, body, route="responses").json()["output"][0]["content"]
    assert part["text"] == "Hi!" and [t["token"] for t in part["logprobs"]] == ["H", "i", "!"]
    assert part["logprobs"][0] == {
        "token": "H",
        "logprob": -0.5,
        "bytes": [72],
        "top_logprobs": [
            {"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")},
            {"token": "alt1", "logprob": -2.0, "bytes": list(b"alt1")},
        ],
    }
    assert engine.calls[0][1].logprobs == 2
    streamed = response_events(call(engine, body | {"stream": True}, route="responses").text)
    (done,) = [e for e in streamed if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == part["logprobs"]
    assert streamed[-1]["response"]["output"][0]["content"][0]["logprobs"] == part["logprobs"]
    plain = call(engine, {"input": "Say hi"}, route="responses").json()  # not asked: none, and none computed
    assert "logprobs" not in plain["output"][0]["content"][0] and engine.calls[-1][1].logprobs is None
    tool = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]
    engine = ScriptedEngine(rounds(PARIS))
    asked = call(
        engine, {"input": "Weather?", "tools": [tool], "include": ["message.output_text.logprobs"]}, route="responses"
    )
    assert [item["type"] for item in asked.json()["output"]] == ["function_call"]  # calls: no output text


def test_the_responses_api_refuses_item_references_as_it_stores_nothing() -> None:
    engine = ScriptedEngine(rounds("unused"))
    body = {"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_1"}]}
    error = assert_error(call(engine, body, route="responses"), 400, "input[1]")
    assert "keeps no responses" in error["message"] and not engine.calls
    assert_error(call(engine, {"input": "hi", "top_logprobs": 21}, route="responses"), 400, "top_logprobs")


def test_engine_errors_are_400s_naming_the_messages() -> None:
    def script(messages: list[dict[str, Any]], params: SamplingParams) -> list[str]:
        raise EngineError("prompt too long for this engine")

    error = assert_error(call(ScriptedEngine(script), {"messages": HELLO}), 400, "messages")
    assert error["message"] == "prompt too long for this engine"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-9", "messages": HELLO}, 404, "model"),
        ({"messages": HELLO, "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "word " * 50}], "max_tokens": 100}, 400, "max_tokens"),
        ({"messages": HELLO, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ],
)
def test_client_mistakes_are_4xx_in_openais_shape(body: dict[str, Any], status: int, param: str) -> None:
    engine = ScriptedEngine(rounds("unused"), max_model_len=64)
    assert_error(call(engine, body), status, param)
    assert not engine.calls  # refused before any work
