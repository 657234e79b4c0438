"""The llama.cpp backend on SmolLM2-135M's own GGUF: the Engine protocol, adapters (converted to GGUF LoRA and
applied per request), cancellation, and the server on top of it through the openai client.

One engine serves the module (llama-server starts in about a second). `make install-test` builds llama-server
(once per machine, about 15 minutes on 2 cores), so these tests run everywhere the suite does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server import model_store
from server.engine import EngineError, Generation, SamplingParams, create_engine
from server.engine.llamacpp import LlamaCppEngine
from server.engine.transformers import TransformersEngine
from tests.conftest import API_KEY, SMOL, RunningServer, make_lora, start_server
from tests.engine_contract import (
    HELLO,
    check_generate_from_messages_and_from_token_ids,
    check_logprobs,
    check_max_tokens_and_stop,
    check_seeded_sampling_is_reproducible_and_n_gives_distinct_samples,
)

ADAPTER = "random-lora"
PROMPTS = ["What is the capital of France?", "Give me three colors.", "Name a fruit.", "Who wrote Hamlet?"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def lora_dir(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA strong enough (alpha 64) that base and adapter share none of their top-5 next tokens."""
    return make_lora(smol_dir, tmp_path_factory.mktemp("llamacpp-adapters") / ADAPTER, alpha=64)


@pytest.fixture(scope="module")
def engine(smol_dir: Path, lora_dir: Path) -> Iterator[LlamaCppEngine]:
    engine = create_engine(
        "llamacpp", str(smol_dir), gguf=model_store.gguf_path(SMOL), max_model_len=2048, max_batch_size=8
    )
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.load_adapter(ADAPTER, lora_dir))
    yield engine
    asyncio.run(engine.close())


def busy_slots(engine: LlamaCppEngine) -> int:
    return sum(slot["is_processing"] for slot in httpx.get(f"{engine.url}/slots").json())


def test_prompts_are_those_of_the_transformers_backend(engine: LlamaCppEngine, smol_dir: Path) -> None:
    reference = TransformersEngine(smol_dir, dtype="float32", max_batch_size=1)
    try:
        for tools in (None, [WEATHER_TOOL]):
            assert engine.encode_chat(HELLO, tools) == reference.encode_chat(HELLO, tools)
    finally:
        asyncio.run(reference.close())


def test_generate_from_messages_and_from_token_ids(engine: LlamaCppEngine) -> None:
    check_generate_from_messages_and_from_token_ids(engine)


def test_logprobs(engine: LlamaCppEngine) -> None:
    check_logprobs(engine)


def test_max_tokens_and_stop(engine: LlamaCppEngine) -> None:
    check_max_tokens_and_stop(engine)


def test_sampling_with_seed_is_reproducible_and_n_gives_distinct_samples(engine: LlamaCppEngine) -> None:
    check_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(engine)


def test_json_schema_constrains_the_output(engine: LlamaCppEngine) -> None:
    arguments = {**WEATHER_TOOL["function"]["parameters"], "additionalProperties": False}
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": ["get_weather"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    prompt = [{"role": "user", "content": "What is the weather in Paris?"}]
    result = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=60, json_schema=schema)))
    call = json.loads(result.text)
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    assert set(call) == {"name", "arguments"} and set(call["arguments"]) == {"city"}


def test_streaming_hands_out_the_text_piece_by_piece(engine: LlamaCppEngine) -> None:
    pieces: list[str] = []
    result = asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=24), on_text=pieces.append))
    assert len(pieces) > 3 and "".join(pieces) == result.text
    assert result.text == asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=24))).text


def test_a_repeated_prompt_comes_from_the_cache(engine: LlamaCppEngine) -> None:
    prompt = [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 20}]
    params = SamplingParams(max_tokens=4)
    first = asyncio.run(engine.generate(prompt, params))
    again = asyncio.run(engine.generate(prompt, params))
    assert again.cached_tokens >= first.prompt_tokens - 1 > first.cached_tokens
    assert again.text == first.text


def top_next_tokens(generation: Generation) -> set[str]:
    (entry,) = generation.completions[0].logprobs or ()
    return {token for token, _ in entry.top}


def test_base_and_adapter_requests_run_together_and_each_gets_its_own(engine: LlamaCppEngine) -> None:
    """Compared by the top-5 next tokens, not by text: llama.cpp is not batch-invariant (a batch of 4 and a batch
    of 1 round differently, log-probabilities up to ~0.4 apart on this 4-bit model), so greedy texts part ways
    at near ties; the top-5 sets of the same request keep at least 3 tokens, base and adapter share none."""
    prompts = [[{"role": "user", "content": q}] for q in PROMPTS]
    params = SamplingParams(max_tokens=1, logprobs=5)

    async def together() -> list[Generation]:
        return await asyncio.gather(
            *(engine.generate(p, params) for p in prompts),
            *(engine.generate(p, params, adapter=ADAPTER) for p in prompts),
        )

    mixed = [top_next_tokens(g) for g in asyncio.run(together())]
    plain = [top_next_tokens(asyncio.run(engine.generate(p, params))) for p in prompts]
    alone = [top_next_tokens(asyncio.run(engine.generate(p, params, adapter=ADAPTER))) for p in prompts]
    assert all(len(base & adapted) <= 1 for base, adapted in zip(plain, alone, strict=True)), (plain, alone)
    for got, own, other in zip(mixed, plain + alone, alone + plain, strict=True):
        assert len(got & own) >= 3 and len(got & other) <= 1, (got, own, other)


def test_a_cancelled_request_is_aborted_in_the_engine(engine: LlamaCppEngine) -> None:
    async def scenario() -> None:
        long = asyncio.create_task(engine.generate(HELLO, SamplingParams(max_tokens=1500), adapter=ADAPTER))
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(busy_slots, engine) == 0:
            assert time.monotonic() < deadline and not long.done(), "the request never started"
            await asyncio.sleep(0.05)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(busy_slots, engine):
            assert time.monotonic() < deadline, "the cancelled request still holds a slot"
            await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_bad_input_is_an_engine_error(engine: LlamaCppEngine, tmp_path: Path) -> None:
    cases = [
        engine.generate([1] * engine.max_model_len, SamplingParams(max_tokens=1)),  # too long
        engine.generate(HELLO, SamplingParams(), adapter="no-such-adapter"),
        engine.generate([], SamplingParams(max_tokens=1)),
        engine.generate(HELLO, SamplingParams(n=0)),
        engine.load_adapter("empty", tmp_path),  # no adapter files
        engine.unload_adapter("no-such-adapter"),
    ]
    for case in cases:
        with pytest.raises(EngineError):
            asyncio.run(case)
    assert engine.adapters() == [ADAPTER]
    assert asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=4))).text  # and the engine still serves


def test_adapters_load_and_unload_without_losing_requests_in_flight(engine: LlamaCppEngine, lora_dir: Path) -> None:
    params = SamplingParams(max_tokens=1, logprobs=5)
    expected = top_next_tokens(asyncio.run(engine.generate(HELLO, params, adapter=ADAPTER)))

    async def load_while_running() -> Generation:
        running = asyncio.create_task(engine.generate(HELLO, SamplingParams(max_tokens=300), adapter=ADAPTER))
        while await asyncio.to_thread(busy_slots, engine) == 0:
            await asyncio.sleep(0.05)
        old = engine.url
        await engine.load_adapter("copy", lora_dir)  # a new llama-server; the old one finishes `running` first
        assert engine.url != old
        return await running

    finished = asyncio.run(load_while_running())
    assert finished.completion_tokens > 0 and finished.finish_reason in ("stop", "length")
    assert engine.adapters() == ["copy", ADAPTER]
    assert len(top_next_tokens(asyncio.run(engine.generate(HELLO, params, adapter="copy"))) & expected) >= 3
    asyncio.run(engine.unload_adapter("copy"))
    assert engine.adapters() == [ADAPTER]
    with pytest.raises(EngineError):
        asyncio.run(engine.generate(HELLO, params, adapter="copy"))


@pytest.fixture(scope="module")
def llamacpp_server(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(SMOL, tmp_path_factory.mktemp("llamacpp"), "--engine", "llamacpp")


def test_the_server_answers_and_streams_on_llamacpp(llamacpp_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=llamacpp_server.v1, api_key=API_KEY)
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(
        model=SMOL, messages=messages, max_tokens=16, extra_body={"refine": "adaptive", "max_refine_iterations": 2}
    )
    assert reply.choices[0].message.content and reply.usage and reply.usage.prompt_tokens > 0
    assert reply.model_extra and reply.model_extra["refinement"]["iterations"] >= 1
    stream = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=16, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip()


REPEAT = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "[get_weather(city='Paris', unit='celsius'), get_time(timezone='Europe/Paris')]"},
    {"role": "user", "content": "Repeat your previous answer exactly."},
]


def test_a_repeated_answer_is_verified_as_a_draft(engine: LlamaCppEngine) -> None:
    """A refine round: the previous answer is in the prompt, and prompt lookup proposes it as the draft."""
    result = asyncio.run(engine.generate(REPEAT, SamplingParams(max_tokens=40)))
    assert result.draft_accepted_tokens > 5 and result.draft_tokens >= result.draft_accepted_tokens, result


def test_without_prompt_lookup_nothing_is_drafted(smol_dir: Path, engine: LlamaCppEngine) -> None:
    """`prompt_lookup=False` (training's sampling, `serve --no-prompt-lookup`): the same repeat is decoded token by
    token, to the same greedy answer."""
    plain = create_engine("llamacpp", str(smol_dir), gguf=model_store.gguf_path(SMOL), prompt_lookup=False)
    try:
        result = asyncio.run(plain.generate(REPEAT, SamplingParams(max_tokens=40)))
    finally:
        asyncio.run(plain.close())
    assert result.draft_tokens == 0 and result.completions[0].token_ids, result
    drafted = asyncio.run(engine.generate(REPEAT, SamplingParams(max_tokens=40)))
    assert result.completions[0].text == drafted.completions[0].text
