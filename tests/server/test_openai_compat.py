"""OpenAI API completeness against the real server: streaming, tool_choice, parallel_tool_calls, n.

SmolLM2 never calls tools on its own, so `required` and named choices producing valid calls here shows the
constrained decoding at work, not the model's manners.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.conftest import RunningServer

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "math.factorial",
            "description": "Factorial of a number.",
            "parameters": {"type": "dict", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
        },
    },
]
# `required` tests offer only get_weather: offered math.factorial too, SmolLM2 sometimes picks it and writes digits
# until max_tokens (a valid integer never ends), which says nothing about the constraint.
WEATHER_TOOL = TOOLS[:1]
WEATHER = [{"role": "user", "content": "What's the weather like in Paris?"}]
FACTORIAL = [{"role": "user", "content": "Compute 5 factorial."}]
HELLO = [{"role": "user", "content": "Say hello in three words."}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(smol_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.v1, api_key=smol_server.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(smol_server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=smol_server.v1, api_key=smol_server.api_key, max_retries=0, timeout=300)


def assert_conforms(call: Any) -> dict[str, Any]:
    """The call names a offered tool and its arguments follow that tool's schema."""
    spec = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    properties = spec["parameters"]["properties"]
    assert set(spec["parameters"]["required"]) <= set(arguments) <= set(properties)
    for name, value in arguments.items():
        expected = properties[name]
        assert isinstance(value, {"string": str, "integer": int}[expected["type"]]), (name, value)
        if "enum" in expected:
            assert value in expected["enum"]
    return arguments


def reassemble(chunks: list[Any]) -> dict[str, Any]:
    """Content, tool calls (by index) and finish reason from streamed chunks, as a client would rebuild them."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


# ---- streaming ----


def test_stream_without_tools_matches_the_plain_response(smol_server: RunningServer, client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": smol_server.model, "messages": HELLO, "max_tokens": 20}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    rebuilt = reassemble(chunks)
    assert rebuilt["content"] == plain.choices[0].message.content
    assert rebuilt["finish"] == plain.choices[0].finish_reason
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "tokens arrive one by one"
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    finish_chunk = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish_chunk.model_extra["refinement"] == {"mode": "none", "iterations": 0, "stop_reason": "none"}
    assert len({c.id for c in chunks}) == 1


def test_streamed_tool_calls_match_the_plain_response(smol_server: RunningServer, client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": smol_server.model, "messages": WEATHER, "tools": TOOLS, "tool_choice": NAMED}
    plain = client.chat.completions.create(**kwargs)
    rebuilt = reassemble(list(client.chat.completions.create(**kwargs, stream=True)))
    expected = plain.choices[0].message.tool_calls
    assert expected and rebuilt["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in rebuilt["calls"]] == [
        (c.function.name, json.loads(c.function.arguments)) for c in expected
    ]
    assert all(c["id"] and c["id"].startswith("call_") for c in rebuilt["calls"])


def test_refinement_while_streaming(smol_server: RunningServer, aclient: openai.AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": smol_server.model,
        "messages": HELLO,
        "max_tokens": 16,
        "extra_body": {"refine": "adaptive", "max_refine_iterations": 3, "return_refinement_history": True},
    }

    async def both() -> tuple[Any, list[Any]]:
        plain = await aclient.chat.completions.create(**kwargs)
        stream = await aclient.chat.completions.create(**kwargs, stream=True)
        return plain, [chunk async for chunk in stream]

    plain, chunks = asyncio.run(both())
    rounds = [c.model_extra["refinement_round"] for c in chunks if "refinement_round" in (c.model_extra or {})]
    info = plain.model_extra["refinement"]
    assert [r["round"] for r in rounds] == list(range(info["iterations"] + 1))
    assert [r["answer"] for r in rounds] == info["answers"]
    assert reassemble(chunks)["content"] == plain.choices[0].message.content
    finish_chunk = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish_chunk.model_extra["refinement"]["mode"] == "adaptive"
    assert finish_chunk.model_extra["refinement"]["iterations"] == info["iterations"]


@pytest.mark.parametrize(
    "extra",
    [{}, {"tools": TOOLS, "tool_choice": NAMED, "refine": "adaptive", "max_refine_iterations": 2}],
    ids=["content", "tool-calls-refined"],
)
def test_sse_wire_format(smol_server: RunningServer, extra: dict[str, Any]) -> None:
    body = {"model": smol_server.model, "messages": WEATHER, "max_tokens": 40, "stream": True, **extra}
    with httpx.stream("POST", f"{smol_server.v1}/chat/completions", json=body, headers=smol_server.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    for chunk in chunks:  # every chunk, extension chunks included, is a valid chunk for the client's own types
        ChatCompletionChunk.model_validate(chunk)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] is chunks[-1]


def test_a_bad_streaming_request_is_a_plain_4xx(smol_server: RunningServer) -> None:
    body = {"model": "nope", "messages": HELLO, "stream": True}
    response = httpx.post(f"{smol_server.v1}/chat/completions", json=body, headers=smol_server.headers)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


# ---- tool_choice and parallel_tool_calls ----


def test_required_produces_valid_calls(smol_server: RunningServer, client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=smol_server.model, messages=WEATHER, tools=WEATHER_TOOL, tool_choice="required", max_tokens=80
    )
    assert result.choices[0].finish_reason == "tool_calls"
    calls = result.choices[0].message.tool_calls
    assert calls
    for call in calls:
        assert_conforms(call)


def test_named_choice_produces_exactly_that_tool(smol_server: RunningServer, client: openai.OpenAI) -> None:
    for name, question in (("get_weather", WEATHER), ("math.factorial", FACTORIAL)):
        result = client.chat.completions.create(
            model=smol_server.model,
            messages=question,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            max_tokens=80,
        )
        calls = result.choices[0].message.tool_calls
        assert calls and len(calls) == 1 and calls[0].function.name == name, result
        assert_conforms(calls[0])


def test_parallel_tool_calls_false_gives_one_call(smol_server: RunningServer, client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "Weather in Paris, Rome and Oslo, and 5 factorial."}]
    result = client.chat.completions.create(
        model=smol_server.model,
        messages=question,
        tools=WEATHER_TOOL,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
    )
    calls = result.choices[0].message.tool_calls
    assert calls and len(calls) == 1
    assert_conforms(calls[0])


def test_required_with_refinement(smol_server: RunningServer, client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=smol_server.model,
        messages=WEATHER,
        tools=WEATHER_TOOL,
        tool_choice="required",
        max_tokens=80,
        extra_body={"refine": "adaptive", "max_refine_iterations": 2},
    )
    assert result.model_extra["refinement"]["iterations"] >= 1
    assert result.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"n": 100}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_choices(smol_server: RunningServer, body: dict[str, Any], param: str) -> None:
    response = httpx.post(
        f"{smol_server.v1}/chat/completions",
        json={"model": smol_server.model, "messages": HELLO, **body},
        headers=smol_server.headers,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# ---- logprobs ----


def test_logprobs_of_the_returned_answer(smol_server: RunningServer, client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": smol_server.model, "messages": HELLO, "max_tokens": 12}
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].logprobs is None  # only when asked
    result = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and result.usage is not None
    assert len(logprobs.content) == result.usage.completion_tokens
    assert (
        "".join(t.token for t in logprobs.content)
        == result.choices[0].message.content
        == plain.choices[0].message.content
    )
    for token in logprobs.content:
        assert bytes(token.bytes or []) == token.token.encode() and token.logprob <= 0
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob == token.logprob  # greedy: a likeliest
    # With refinement: the tokens of the round whose answer was returned; streamed: all on the finish chunk.
    refined = client.chat.completions.create(**kwargs, logprobs=True, extra_body={"refine": "adaptive"})
    refined_tokens = [t.token for t in refined.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert "".join(refined_tokens) == refined.choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.content or []]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in logprobs.content]


# ---- n ----


def test_n_choices(smol_server: RunningServer, client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=smol_server.model, messages=HELLO, max_tokens=12, n=3, temperature=1.0, seed=11
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.message.content for c in result.choices]
    assert len(set(texts)) > 1
    single = client.chat.completions.create(
        model=smol_server.model, messages=HELLO, max_tokens=12, temperature=1.0, seed=11
    )
    assert texts[0] == single.choices[0].message.content  # choice 0 uses the request's own seed
    assert result.usage is not None and single.usage is not None
    assert result.usage.prompt_tokens == 3 * single.usage.prompt_tokens
