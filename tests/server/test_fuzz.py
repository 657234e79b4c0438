"""Schemathesis fuzzing of the server's own OpenAPI schema, against a real SmolLM2 server.

Every generated request, valid (positive) or not (negative), must get an answer below 500; error answers must be in
OpenAI's error shape, successful ones must match the documented content type and the server's response models.

FastAPI's generated schema documents 200 (and 422, which this server never sends: it answers 400 in OpenAI's shape),
so status-code conformance is not checked. Two documented content types are knowingly wrong and checked by hand:
a streamed completion is text/event-stream, /metrics is Prometheus text.

The module's server caps tokens, choices and rounds, so that any valid request finishes in seconds on a CPU.
Server bugs this found (500s) are regression tests at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from openai.types.responses import Response as ResponsesResponse
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from server.protocol import TOOL_NAME, ChatCompletionResponse
from server.tool_choice import json_schema
from tests.conftest import SMOL, RunningServer, start_server

ADMIN_KEY = "admin-key"
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
ADAPTER_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@pytest.fixture(scope="module")
def server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    adapters = tmp_path_factory.mktemp("fuzz-adapters")  # empty: adapter routes can only refuse, but must refuse well
    yield from start_server(
        SMOL,
        tmp_path_factory.mktemp("fuzz"),
        "--max-tokens",
        "8",
        "--default-max-tokens",
        "8",
        "--max-n",
        "2",
        "--max-refine-iterations",
        "2",
        "--adapters-dir",
        str(adapters),
        "--admin-api-key",
        ADMIN_KEY,
        "--request-timeout",
        "300",  # a 504 would be a legitimate answer and hide nothing, but slow CI should not turn cases into 504s
    )


@pytest.fixture(scope="module")
def schema(server: RunningServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=server.headers, timeout=30)


def headers_for(server: RunningServer, path: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"} if path in ADAPTER_ROUTES else server.headers


def assert_openai_error(response: Response) -> None:
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def assert_event_stream(response: Response) -> None:
    assert response.headers.get("content-type", [""])[0].startswith("text/event-stream"), response.headers
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events and events[-1] == "[DONE]", events[-3:]
    for event in events[:-1]:
        chunk = json.loads(event)
        # A failure after the 200 went out is an error event; the server_error type is the streamed 500.
        assert chunk.get("error", {}).get("type") != "server_error", chunk
        if "error" not in chunk:
            assert chunk["object"] == "chat.completion.chunk", chunk


def assert_responses_event_stream(response: Response) -> None:
    """The Responses API's events: `event:` and `data:` lines, no `[DONE]`, ending in the response or an error."""
    assert response.headers.get("content-type", [""])[0].startswith("text/event-stream"), response.headers
    events = [json.loads(block.split("data: ", 1)[1]) for block in response.text.split("\n\n") if block]
    assert events, response.text
    assert not any(e["type"] == "error" and e.get("code") == "server_error" for e in events), events[-3:]
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "error"), events[-3:]


def check(case: Case, response: Response, path: str) -> None:
    """Our checks, on top of schemathesis' own."""
    streamed = path in (CHAT, RESPONSES) and isinstance(case.body, dict) and case.body.get("stream") is True
    documented_type_is_wrong = path == "/metrics" or (streamed and response.status_code == 200)
    checks = [not_a_server_error, response_schema_conformance]
    if not documented_type_is_wrong:
        checks.append(content_type_conformance)
    case.validate_response(response, checks=checks)
    if response.status_code >= 400:
        assert_openai_error(response)
    elif path == "/metrics":
        assert response.headers["content-type"][0].startswith("text/plain"), response.headers
    elif streamed:
        (assert_event_stream if path == CHAT else assert_responses_event_stream)(response)
    elif path == CHAT:
        ChatCompletionResponse.model_validate(response.json())  # the full response shape, not just "an object"
    elif path == RESPONSES:
        ResponsesResponse.model_validate(response.json())  # as the openai SDK parses it


def fuzz(
    server: RunningServer, schema: schemathesis.BaseSchema, path: str, method: str, mode: GenerationMode, n: int
) -> None:
    operation = schema[path][method]
    cases = operation.as_strategy(generation_mode=mode)
    if path in (CHAT, RESPONSES) and mode == GenerationMode.POSITIVE:
        # The schema cannot say that a message needs content or that max_tokens is capped at 8 here, so almost every
        # generated "valid" request is a 400. Three in four are repaired to pass those checks and reach the engine.
        cases = st.tuples(cases, st.integers(0, 3)).map(lambda pair: repaired(*pair, model=server.model))

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Case) -> None:
        response = case.call(base_url=server.base_url, headers=headers_for(server, path), timeout=300)
        check(case, response, path)

    try:
        run()
    except BaseException:
        print(server.log()[-6000:])  # the traceback of a 500 is in the server's log
        raise


def repaired(case: Case, draw: int, *, model: str) -> Case:
    body = case.body
    if draw == 3 or not isinstance(body, dict):  # not 0: Hypothesis favours small values
        return case
    body["model"] = model  # a made-up model name is a 404 before any work
    for message in body.get("messages", []) if isinstance(body.get("messages"), list) else []:
        if message.get("content") is None and (message.get("role") != "assistant" or not message.get("tool_calls")):
            message["content"] = "Say hi."
    for i, tool in enumerate(body.get("tools") or []):
        function = tool.get("function", tool)  # chat nests the function; the Responses API does not
        if isinstance(function.get("name"), str) and not TOOL_NAME.match(function["name"]):
            function["name"] = f"f{i}"
    # Keep each limit's value (the generator's edge cases: 1, the cap) but fold the ones beyond the cap into it.
    # JSON Schema integers may come as floats (3.0), which the server accepts as integers too.
    caps = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 2, "max_refine_iterations": 2}
    for field, cap in caps.items():
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
            body[field] = int(value) % cap + 1
    return case


@pytest.mark.parametrize(
    ("path", "method", "mode", "max_examples"),
    [
        (CHAT, "POST", GenerationMode.POSITIVE, 80),
        (CHAT, "POST", GenerationMode.NEGATIVE, 80),
        (RESPONSES, "POST", GenerationMode.POSITIVE, 40),
        (RESPONSES, "POST", GenerationMode.NEGATIVE, 40),
        ("/v1/load_lora_adapter", "POST", GenerationMode.POSITIVE, 20),
        ("/v1/load_lora_adapter", "POST", GenerationMode.NEGATIVE, 20),
        ("/v1/unload_lora_adapter", "POST", GenerationMode.POSITIVE, 20),
        ("/v1/unload_lora_adapter", "POST", GenerationMode.NEGATIVE, 20),
        ("/v1/models", "GET", GenerationMode.POSITIVE, 3),
        ("/metrics", "GET", GenerationMode.POSITIVE, 3),
        ("/health", "GET", GenerationMode.POSITIVE, 3),
    ],
    ids=lambda v: v.value if isinstance(v, GenerationMode) else str(v),
)
def test_fuzz(
    server: RunningServer,
    schema: schemathesis.BaseSchema,
    path: str,
    method: str,
    mode: GenerationMode,
    max_examples: int,
) -> None:
    fuzz(server, schema, path, method, mode, max_examples)


# ---- tool schemas under constrained decoding ----
# The OpenAPI schema says only that `parameters` is an object, so schemathesis rarely builds a tool schema worth the
# name. These are JSON Schemas as clients write them (BFCL's Python type names included) and as they get them wrong:
# enums of the wrong type, empty ranges (unknown types, broken patterns and $refs: the 400 test at the end).
TYPES = ["string", "integer", "number", "boolean", "array", "object", "null", "dict", "float", "tuple", "any"]
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6))
PARAMETER_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)


def leaf_schemas() -> SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.sampled_from(TYPES)},
        optional={
            "description": st.text(max_size=16),
            "enum": st.lists(JSON_VALUES, min_size=1, max_size=3),
            "minimum": st.integers(-10, 10),
            "maximum": st.integers(-10, 10),
            "minLength": st.integers(0, 4),
            "maxLength": st.integers(0, 4),
            "pattern": st.sampled_from([r"^[a-z]+$", r"\d{3}", r"[^\n]*"]),
            "format": st.sampled_from(["date-time", "email", "uuid", "bogus"]),
            "default": JSON_VALUES,
        },
    )


def parameter_schemas() -> SearchStrategy[dict[str, Any]]:
    nodes = st.recursive(
        leaf_schemas(),
        lambda children: st.one_of(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["array", "tuple"]), "items": children},
                optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 3)},
            ),
            st.fixed_dictionaries(
                {"type": st.sampled_from(["object", "dict"]), "properties": st.dictionaries(PARAMETER_NAMES, children)},
                optional={"additionalProperties": st.booleans()},
            ),
            st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
        ),
        max_leaves=6,
    )
    return st.dictionaries(PARAMETER_NAMES, nodes, max_size=4).flatmap(
        lambda properties: st.fixed_dictionaries(
            {
                "type": st.sampled_from(["object", "dict"]),
                "properties": st.just(properties),
                "required": st.lists(st.sampled_from(sorted(properties)), unique=True) if properties else st.just([]),
            }
        )
    )


def tool_requests(model: str) -> SearchStrategy[dict[str, Any]]:
    tools = st.lists(
        st.builds(
            lambda name, parameters: {"type": "function", "function": {"name": name, "parameters": parameters}},
            st.from_regex(TOOL_NAME, fullmatch=True),
            parameter_schemas(),
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda tool: tool["function"]["name"],
    )

    def request(tools: list[dict[str, Any]], choice: str, extra: dict[str, Any]) -> dict[str, Any]:
        named = {"type": "function", "function": {"name": tools[-1]["function"]["name"]}}
        return {
            "model": model,
            "messages": [{"role": "user", "content": "Call the tool."}],
            "tools": tools,
            "tool_choice": named if choice == "named" else choice,
            "max_tokens": 48,
            "max_refine_iterations": 1,
            "seed": 0,  # with derandomize below, the same calls come back each run
            **extra,
        }

    extra = st.fixed_dictionaries(
        {},
        optional={
            "parallel_tool_calls": st.booleans(),
            "stream": st.booleans(),
            "refine": st.sampled_from(["none", "adaptive", "vanilla"]),
            "temperature": st.sampled_from([0.0, 0.7]),
        },
    )
    return st.builds(request, tools, st.sampled_from(["required", "named", "auto"]), extra)


def assert_calls_follow_the_schemas(body: dict[str, Any], data: dict[str, Any]) -> int:
    """Under `required` or a named tool the calls are decoded under the tools' grammar: each one names an offered tool
    (the named one, if named) and its arguments validate against that tool's parameters."""
    if body["tool_choice"] == "auto":
        return 0  # free decoding: a small model's calls may be anything, the parser keeps what it can read
    # BFCL-style type names (`dict`, `float`, `tuple`) read as the JSON Schema types the server takes them for
    offered = {tool["function"]["name"]: json_schema(tool["function"]["parameters"]) for tool in body["tools"]}
    if isinstance(body["tool_choice"], dict):
        offered = {name: offered[name] for name in [body["tool_choice"]["function"]["name"]]}
    calls = [call for choice in data["choices"] for call in choice["message"].get("tool_calls") or []]
    for call in calls:
        name = call["function"]["name"]
        assert name in offered, (body, call)
        jsonschema.validate(json.loads(call["function"]["arguments"]), offered[name])
    return len(calls)


@pytest.fixture(scope="module")
def tool_server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Room for whole calls (the module's server stops every answer at 8 tokens, before any call is complete)."""
    yield from start_server(SMOL, tmp_path_factory.mktemp("fuzz-tools"), "--max-refine-iterations", "1")


def test_fuzz_tool_schemas(tool_server: RunningServer) -> None:
    server = tool_server
    checked = 0

    # derandomized: the count of checked calls is a property of the code, not of the draw (a random draw once gave 4)
    @settings(max_examples=20, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=tool_requests(server.model))
    def run(body: dict[str, Any]) -> None:
        response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
        elif body.get("stream"):
            events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
            assert events[-1] == "[DONE]" and not any('"server_error"' in e for e in events), (body, events)
        else:
            ChatCompletionResponse.model_validate(response.json())
            nonlocal checked
            checked += assert_calls_follow_the_schemas(body, response.json())

    try:
        run()
        print(f"schema check: {checked} calls")
        assert checked >= 5, f"only {checked} calls came back under required/named: the schema check saw too few"
    except BaseException:
        print(server.log()[-6000:])
        raise


def test_schema_needs_the_key_and_the_server_logged_no_crash(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=30)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # Runs after the fuzz cases (file order): nothing they sent may have crashed a handler or a stream.
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log and "stream failed" not in log, log[-6000:]


def test_default_rounds_fit_a_lower_cap(server: RunningServer) -> None:
    # The protocol's default is 5 rounds; this server's cap is 2: leaving the field out means "as many as allowed".
    for refine, rounds in (("none", 0), ("vanilla", 2)):
        body = {"model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "refine": refine}
        response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["refinement"]["iterations"] == rounds, response.text


def test_tiny_temperature_is_not_a_server_error(server: RunningServer) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 1e-300}
    body |= {"max_refine_iterations": 1}
    response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("seed", "n"), [(2**64, 1), (-(2**63) - 1, 1), (2**64 - 1, 2)])
def test_out_of_range_seed_is_not_a_server_error(server: RunningServer, seed: int, n: int) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0.7}
    body |= {"seed": seed, "n": n, "max_refine_iterations": 1}
    response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
    assert response.status_code == 200, response.text  # the README: any integer is a valid seed


@pytest.mark.parametrize(
    "parameter",
    [{"type": "foo"}, {"type": "string", "enum": [1]}, {"type": "string", "pattern": "("}, {"$ref": "#/nowhere"}],
    ids=["unknown-type", "unsatisfiable-enum", "bad-pattern", "dangling-ref"],
)
def test_undecodable_tool_schema_is_a_400_naming_it(server: RunningServer, parameter: dict[str, Any]) -> None:
    parameters = {"type": "object", "properties": {"a": parameter}, "required": ["a"]}
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Call f."}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        "tool_choice": "required",
        "max_tokens": 8,
        "max_refine_iterations": 1,
    }
    response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools[0].function.parameters", response.text
