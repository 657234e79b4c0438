"""POST /v1/responses (OpenAI's Responses API): the translation to and from chat completions, then the real server
through the official openai client (which parses every response and event into its own types) and raw httpx.

SmolLM2 never calls tools on its own, so `tool_choice="required"` is what guarantees a call here (constrained
decoding), which keeps these tests deterministic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from server.engine import SamplingParams
from server.errors import BadRequest
from server.responses import ResponsesRequest, responses_param, sse, to_chat_request
from tests import samples
from tests.conftest import RunningServer, assert_error

# tests/samples.py's tool in the Responses shape: the function's fields beside `type`
WEATHER_TOOL: dict[str, Any] = {"type": "function", **samples.WEATHER_TOOL["function"], "strict": False}
WEATHER = "What's the weather like in Paris?"
HELLO = "Say hello in three words."
STORY = "Write a long story about a dragon."
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def client(smol_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.v1, api_key=smol_server.api_key, max_retries=0, timeout=300)


def squash(types: list[str]) -> list[str]:
    """Event types with runs of the same type collapsed (deltas come in runs)."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


# ---- the translation, without a model ----


def test_to_chat_request_maps_items_onto_messages() -> None:
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "18"}]},
                {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 7,
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}},
            "store": True,
            "stream": True,
            "refine": "adaptive",
        }
    )
    chat = to_chat_request(body)
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    call = {"type": "function", "function": {"name": "get_weather"}}
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [  # the text and both consecutive calls: one assistant message
                {"id": "call_1", **call, "function": {**call["function"], "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", **call, "function": {**call["function"], "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "18", "tool_call_id": "call_2"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_3", **call, "function": {**call["function"], "arguments": '{"city": "Oslo"}'}}],
        },
    ]
    assert [t.model_dump(exclude_none=True) for t in chat.tools or []] == [
        {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    ]
    assert chat.tool_choice is not None and chat.tool_choice.model_dump() == call
    assert chat.max_tokens == 7 and chat.refine == "adaptive" and chat.n == 1
    assert chat.stream and chat.stream_options is not None and chat.stream_options.include_usage
    assert "max_refine_iterations" not in chat.model_fields_set  # so the server's cap applies, as on chat
    response_format = chat.model_dump(by_alias=True)["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "answer"
    assert response_format["json_schema"]["schema"] == {"type": "object"}


def test_a_string_input_is_one_user_message() -> None:
    chat = to_chat_request(ResponsesRequest.model_validate({"model": "m", "input": "hi", "temperature": 0.5}))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [{"role": "user", "content": "hi"}]
    assert chat.temperature == 0.5 and chat.tools is None and not chat.stream


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ],
)
def test_what_needs_stored_responses_is_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        to_chat_request(ResponsesRequest.model_validate({"model": "m", "input": "hi"} | extra))
    assert caught.value.param == param
    assert "keeps no responses" in caught.value.message


def test_chat_params_are_named_as_responses_fields() -> None:
    assert responses_param("max_tokens") == "max_output_tokens"
    assert responses_param("messages[3].content") == "input"
    assert responses_param("tools[1].function.parameters") == "tools[1].parameters"
    assert responses_param("response_format.json_schema.name") == "text.format"
    assert responses_param("tool_choice") == "tool_choice"
    assert responses_param(None) is None


def test_an_error_mid_stream_is_an_error_event() -> None:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        raise BadRequest("the engine refused", param="messages", code="engine_error")

    async def frames_of() -> list[bytes]:
        return [frame async for frame in sse(body, SamplingParams(), "m", chunks())]

    body = ResponsesRequest.model_validate({"model": "m", "input": "hi", "stream": True})
    frames = asyncio.run(frames_of())
    events = [json.loads(frame.decode().split("data: ", 1)[1]) for frame in frames]
    assert [e["type"] for e in events][-1] == "error"
    assert events[-1] == {
        "type": "error",
        "sequence_number": len(events) - 1,
        "code": "engine_error",
        "message": "the engine refused",
        "param": "input",
    }
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert frames[0].startswith(b"event: response.created\ndata: ")


# ---- the real server through the openai client ----


def test_plain_text_response(smol_server: RunningServer, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=smol_server.model,
        input=HELLO,
        max_output_tokens=16,
        store=True,
        metadata={"ticket": "42"},
        truncation="disabled",  # a field this server does not model: accepted and ignored
    )
    body = raw.http_response.json()
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert [item.type for item in response.output] == ["message"]
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert response.output_text.strip() and response.output_text == message.content[0].text  # type: ignore[union-attr]
    assert response.usage is not None and 0 < response.usage.output_tokens <= 16
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert body["store"] is False and body["metadata"] == {"ticket": "42"} and body["error"] is None
    assert "output_text" not in body  # the SDK computes it
    assert body["max_output_tokens"] == 16 and body["temperature"] == 0.0 and body["tool_choice"] == "auto"
    assert body["refinement"] == {"mode": "none", "iterations": 0, "stop_reason": "none"}
    # The same answer as chat completions gives for the same conversation (greedy decoding).
    chat = client.chat.completions.create(
        model=smol_server.model, messages=[{"role": "user", "content": HELLO}], max_tokens=16
    )
    assert response.output_text == chat.choices[0].message.content
    assert chat.usage is not None and response.usage.input_tokens == chat.usage.prompt_tokens


def test_output_text_logprobs_match_chat_completions(smol_server: RunningServer, client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=smol_server.model,
        input=HELLO,
        max_output_tokens=8,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and len(part.logprobs) > 0  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in part.logprobs)  # type: ignore[union-attr]
    chat = client.chat.completions.create(
        model=smol_server.model,
        messages=[{"role": "user", "content": HELLO}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert [t.token for t in part.logprobs] == [t.token for t in chat.choices[0].logprobs.content]  # type: ignore[union-attr]


def test_instructions_are_a_system_message(smol_server: RunningServer, client: openai.OpenAI) -> None:
    pirate = "You are a pirate."
    instructed = client.responses.create(model=smol_server.model, input=HELLO, instructions=pirate, max_output_tokens=4)
    messages: Any = [{"role": "system", "content": pirate}, {"role": "user", "content": HELLO}]
    # Its own cache salt: both prompts computed from scratch. Reusing the first one's cached prefix is not bit-exact in
    # bfloat16 and changed the greedy answer on one CPU (AVX-512 BF16 without AMX).
    fresh = {"cache_salt": "instructions"}
    chat = client.chat.completions.create(model=smol_server.model, messages=messages, max_tokens=4, extra_body=fresh)
    plain = client.responses.create(model=smol_server.model, input=HELLO, max_output_tokens=4)
    assert instructed.instructions == pirate
    assert instructed.usage is not None and chat.usage is not None and plain.usage is not None
    assert instructed.usage.input_tokens == chat.usage.prompt_tokens != plain.usage.input_tokens
    assert instructed.output_text == chat.choices[0].message.content


def test_required_tool_choice_returns_a_function_call(smol_server: RunningServer, client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=smol_server.model,
        input=WEATHER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=48,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.status == "completed"
        assert call.id is not None and call.id.startswith("fc_") and call.call_id
        arguments = json.loads(call.arguments)
        assert isinstance(arguments, dict) and "city" in arguments and set(arguments) <= {"city", "unit"}
    assert response.tool_choice == "required"
    assert [tool.name for tool in response.tools] == ["get_weather"]  # type: ignore[union-attr]


def test_a_named_tool_choice(smol_server: RunningServer, client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=smol_server.model,
        input=WEATHER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=48,
    )
    assert [(item.type, getattr(item, "name", None)) for item in response.output] == [("function_call", "get_weather")]
    assert response.tool_choice.type == "function" and response.tool_choice.name == "get_weather"  # type: ignore[union-attr]


def test_streamed_text_matches_the_plain_response(smol_server: RunningServer, client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": smol_server.model, "input": HELLO, "max_output_tokens": 16}
    plain = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    types = [event.type for event in events]
    final = events[-1].response  # type: ignore[union-attr]
    assert squash(types) == ["response.created", "response.in_progress", *TEXT_EVENTS, f"response.{plain.status}"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1, "tokens arrive one by one"
    assert "".join(deltas) == final.output_text == plain.output_text
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id  # type: ignore[union-attr]
    assert final.usage is not None and plain.usage is not None
    assert final.usage.model_dump() == plain.usage.model_dump()
    assert final.model_extra["refinement"] == {"mode": "none", "iterations": 0, "stop_reason": "none"}


def test_streamed_function_call_through_the_stream_helper(smol_server: RunningServer, client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=smol_server.model,
        input=WEATHER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=48,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    # Without refinement too, the answer to a request with tools is decided before it is sent: the one round is
    # reported as it finishes (as on chat completions), then the call streams.
    types = squash([event.type for event in events])
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.refinement_round",
        "response.output_item.added",
    ]
    assert types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types and "response.output_text.delta" not in types
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" for call in calls)
    streamed_arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed_arguments == "".join(call.arguments for call in calls)
    assert isinstance(json.loads(calls[0].arguments), dict)


def test_streamed_refinement_reports_do_not_trouble_the_client(
    smol_server: RunningServer, client: openai.OpenAI
) -> None:
    kwargs: dict[str, Any] = {
        "model": smol_server.model,
        "input": WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "max_output_tokens": 48,
        "extra_body": {"refine": "adaptive", "max_refine_iterations": 2},
    }
    with client.responses.stream(**kwargs) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types.count("response.refinement_round") >= 2  # round 0 and at least one refine round
    assert types[-1] == "response.completed"
    refinement = final.model_extra["refinement"]  # type: ignore[index]
    assert refinement["mode"] == "adaptive" and refinement["iterations"] == types.count("response.refinement_round") - 1
    assert any(item.type == "function_call" for item in final.output)


def test_text_format_json_schema(smol_server: RunningServer, client: openai.OpenAI) -> None:
    place = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    text: Any = {"format": {"type": "json_schema", "name": "place", "schema": place, "strict": True}}
    raw = client.responses.with_raw_response.create(
        model=smol_server.model, input="Name a city in France.", text=text, max_output_tokens=48
    )
    response = raw.parse()
    assert response.status == "completed", response
    assert set(json.loads(response.output_text)) == {"city"}  # unconstrained, SmolLM2 answers in prose
    assert raw.http_response.json()["text"] == text


def test_two_turn_tool_loop(smol_server: RunningServer, client: openai.OpenAI) -> None:
    conversation: list[Any] = [{"role": "user", "content": WEATHER}]
    kwargs: dict[str, Any] = {"model": smol_server.model, "tools": [WEATHER_TOOL], "max_output_tokens": 48}
    first = client.responses.create(input=conversation, tool_choice="required", **kwargs)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls
    conversation += first.output  # what the SDK returned goes back as input items, as OpenAI's guide does
    conversation += [
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature_c": 21})}
        for call in calls
    ]
    second = client.responses.create(input=conversation, **kwargs)
    assert second.status in ("completed", "incomplete") and second.output
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its output are in the prompt
    # The same prompt as the chat conversation with an assistant tool_calls message and tool messages.
    messages: Any = [
        {"role": "user", "content": WEATHER},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ],
        },
        *({"role": "tool", "tool_call_id": c.call_id, "content": json.dumps({"temperature_c": 21})} for c in calls),
    ]
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    chat = client.chat.completions.create(model=smol_server.model, messages=messages, tools=[chat_tool], max_tokens=48)
    assert chat.usage is not None and second.usage.input_tokens == chat.usage.prompt_tokens


def test_refine_in_the_body(smol_server: RunningServer, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=smol_server.model, input=HELLO, max_output_tokens=8, extra_body={"refine": "adaptive"}
    )
    refinement = raw.http_response.json()["refinement"]
    assert refinement["mode"] == "adaptive" and refinement["iterations"] >= 1
    assert raw.parse().output_text


def test_refine_as_a_query_parameter(smol_server: RunningServer) -> None:
    body = {"model": smol_server.model, "input": HELLO, "max_output_tokens": 8}
    response = smol_server.post("responses", body, params={"refine": "adaptive"})
    assert response.status_code == 200, response.text
    assert response.json()["refinement"]["mode"] == "adaptive"


def test_max_output_tokens_makes_it_incomplete(smol_server: RunningServer, client: openai.OpenAI) -> None:
    response = client.responses.create(model=smol_server.model, input=STORY, max_output_tokens=4)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    events = list(client.responses.create(model=smol_server.model, input=STORY, max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text  # type: ignore[union-attr]


# ---- errors in OpenAI's shape ----


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id", "keeps no responses"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {"type": "input_image", "image_url": "https://example.com/a.png"},
                        ],
                    }
                ]
            },
            "input[0].content[1]",
            "text only",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
        ({"input": [{"type": "function_call", "name": "get_weather"}]}, "input[0]", "call_id"),
        ({"max_output_tokens": 100_000}, "max_output_tokens", "at most"),
        ({"tools": [{**WEATHER_TOOL, "parameters": {"type": "string"}}]}, "tools[0].parameters", "JSON Schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format", "needs `name`"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wizard"}}}},
            "text.format",
            "wizard",
        ),
    ],
    ids=[
        "previous_response_id",
        "image",
        "web_search",
        "tool_choice",
        "incomplete-item",
        "limit",
        "bad-schema",
        "unnamed-format",
        "bad-format-schema",
    ],
)
def test_bad_requests(smol_server: RunningServer, extra: dict[str, Any], param: str, says: str) -> None:
    body = {"model": smol_server.model, "input": HELLO, **extra}
    error = assert_error(smol_server.post("responses", body), 400, param)
    assert error["type"] == "invalid_request_error" and says in error["message"], error


def test_a_bad_streaming_request_is_a_plain_400(smol_server: RunningServer) -> None:
    body = {"model": smol_server.model, "input": HELLO, "stream": True, "previous_response_id": "resp_1"}
    assert_error(smol_server.post("responses", body), 400, "previous_response_id")


def test_the_api_key_is_required(smol_server: RunningServer) -> None:
    response = httpx.post(f"{smol_server.v1}/responses", json={"model": smol_server.model, "input": HELLO}, timeout=30)
    assert_error(response, 401, None)


def test_errors_through_the_client(smol_server: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input=HELLO)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=smol_server.model, input=HELLO, previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id"
