"""The transformers engine on the real SmolLM2-135M: batching, sampling, stops, cancellation, a free event loop."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from server.engine import EngineError, Generation, SamplingParams
from server.engine.transformers import TransformersEngine
from tests.engine_contract import (
    HELLO,
    check_logprobs,
    check_max_tokens_and_stop,
    check_seeded_sampling_is_reproducible_and_n_gives_distinct_samples,
)


@pytest.fixture(scope="module")
def engine(smol_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(smol_dir, max_batch_size=4)
    yield engine
    asyncio.run(engine.close())


def test_generate_from_messages_and_from_token_ids(engine: TransformersEngine) -> None:
    params = SamplingParams(max_tokens=12)
    from_messages = asyncio.run(engine.generate(HELLO, params))
    from_ids = asyncio.run(engine.generate(engine.encode_chat(HELLO), params))
    assert from_messages.text == from_ids.text and from_messages.text.strip()
    assert from_messages.prompt_tokens == len(engine.encode_chat(HELLO))
    assert 0 < from_messages.completion_tokens <= 12


def test_logprobs(engine: TransformersEngine) -> None:
    check_logprobs(engine)


def test_max_tokens_and_stop(engine: TransformersEngine) -> None:
    check_max_tokens_and_stop(engine)


def test_sampling_with_seed_is_reproducible_and_n_gives_distinct_samples(engine: TransformersEngine) -> None:
    check_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(engine)


def test_concurrent_requests_each_get_their_own_answer(engine: TransformersEngine) -> None:
    questions = ["What is 2+2?", "Name a fruit.", "Spell the word cat."]
    prompts = [[{"role": "user", "content": q}] for q in questions]

    async def together() -> list[str]:
        results = await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=12)) for p in prompts))
        return [r.text for r in results]

    batched = asyncio.run(together())
    alone = [asyncio.run(engine.generate(p, SamplingParams(max_tokens=12))).text for p in prompts]
    # bf16 with left padding may round differently late in an answer; the answers must still be each prompt's own
    for b, a in zip(batched, alone, strict=True):
        assert b[:8] == a[:8], (b, a)


@contextmanager
def forward_passes(engine: TransformersEngine) -> Iterator[list[tuple[int, int]]]:
    """(thread, batch rows) of every forward pass the engine's model runs while inside."""
    passes: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        passes.append((threading.get_ident(), kwargs["input_ids"].shape[0]))

    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


def test_event_loop_is_never_blocked(engine: TransformersEngine) -> None:
    """The model runs on the engine's worker thread, never on the caller's event loop."""
    with forward_passes(engine) as passes:
        asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=40, temperature=1.0, seed=1)))
    assert passes and threading.get_ident() not in {thread for thread, _ in passes}


# An answer that cannot end before max_tokens: the schema holds back the end of the array for 300 numbers.
ENDLESS = SamplingParams(max_tokens=400, json_schema={"type": "array", "items": {"type": "integer"}, "minItems": 300})


def test_cancelled_request_frees_the_engine(engine: TransformersEngine) -> None:
    """Seen in the forward passes, not in seconds: once the cancel has reached the engine, the cancelled row takes
    part in one more pass at most (the worker checks the flag as it takes in that pass's token, and the quick request
    may have joined the batch by then); a cancelled row kept in the batch would make every pass two rows wide."""

    async def scenario() -> tuple[list[tuple[int, int]], int, str]:
        started = asyncio.Event()
        with forward_passes(engine) as passes:
            long = asyncio.create_task(engine.generate(HELLO, ENDLESS, on_text=lambda _: started.set()))
            await started.wait()
            long.cancel()
            # Only once the cancel has reached generate() is the job flagged: the quick request sent before that
            # could join a batch that still decodes the long row.
            with suppress(asyncio.CancelledError):
                await long
            at_cancel = len(passes)
            quick = await engine.generate(HELLO, SamplingParams(max_tokens=4))
            return passes, at_cancel, quick.text

    passes, at_cancel, quick = asyncio.run(scenario())
    extra_rows = sum(rows - 1 for _, rows in passes[at_cancel:])  # the quick request is alone but for these
    assert quick and len(passes) > at_cancel + 1 and extra_rows <= 1, passes


# An answer that cannot end early: the schema holds back the end of the array for 40 numbers (80+ tokens).
LONG_ANSWER = SamplingParams(max_tokens=60, json_schema={"type": "array", "items": {"type": "integer"}, "minItems": 40})


def test_a_request_arriving_mid_batch_joins_it(engine: TransformersEngine) -> None:
    """Continuous batching: a short request sent while a long answer is being decoded is answered before that
    answer ends (it used to wait for the whole batch), and gets the text it gets alone."""

    async def scenario() -> tuple[str, bool, Generation]:
        started = asyncio.Event()
        long = asyncio.create_task(engine.generate(HELLO, LONG_ANSWER, on_text=lambda _: started.set()))
        await started.wait()  # its batch is decoding
        quick = await engine.generate(HELLO, SamplingParams(max_tokens=6))
        long_still_running = not long.done()
        return quick.text, long_still_running, await long

    quick, long_still_running, long = asyncio.run(scenario())
    assert long_still_running, "the short request waited for the long answer to finish"
    assert long.completion_tokens == 60 and long.text.startswith("[")
    alone = asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=6))).text
    assert quick[:8] == alone[:8], (quick, alone)  # bf16 with left padding: see the concurrent-requests test


def test_a_failing_request_fails_alone(engine: TransformersEngine, caplog: pytest.LogCaptureFixture) -> None:
    # A schema no matcher can follow (the server refuses it before the engine; here it goes straight in), batched
    # with sound requests, among them the edge cases fuzzing found: a seed beyond 64 bits, a temperature of 1e-300.
    bad = SamplingParams(max_tokens=4, json_schema={"type": "foo"})
    sound = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, temperature=1.0, seed=2**64 + 5, n=2)]
    sound.append(SamplingParams(max_tokens=6, temperature=1e-300))

    async def scenario() -> list[Any]:
        blocker = asyncio.create_task(engine.generate(HELLO, SamplingParams(max_tokens=30)))
        await asyncio.sleep(0.2)  # the rest queue behind it and are taken as one batch
        results = await asyncio.gather(*(engine.generate(HELLO, p) for p in [bad, *sound]), return_exceptions=True)
        await blocker
        return results

    failed, *answered = asyncio.run(scenario())
    assert isinstance(failed, ValueError), failed
    assert all(not isinstance(a, BaseException) and a.text for a in answered), answered
    assert answered[2].text == asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=6))).text  # greedy
    assert re.search(r"generation failed for a batch of [2-9] requests", caplog.text)  # others did share its batch


def test_prompt_too_long_is_an_engine_error(engine: TransformersEngine) -> None:
    with pytest.raises(EngineError):
        asyncio.run(engine.generate([1] * engine.max_model_len, SamplingParams(max_tokens=1)))
    with pytest.raises(EngineError):
        asyncio.run(engine.generate(HELLO, SamplingParams(), adapter="no-such-adapter"))


# ---- the fast refinement path: prefix reuse and draft verification, exact against plain greedy decoding ----
# float32 here: bf16 sums differ between a 1-token and a many-token forward pass, which may flip a near tie.


@pytest.fixture(scope="module")
def exact(smol_dir: Path) -> Iterator[tuple[TransformersEngine, TransformersEngine]]:
    """(fast engine, plain engine without a prefix cache), both float32."""
    fast = TransformersEngine(smol_dir, dtype="float32", max_batch_size=4)
    plain = TransformersEngine(smol_dir, dtype="float32", max_batch_size=4, prefix_cache_tokens=0)
    yield fast, plain
    asyncio.run(fast.close())
    asyncio.run(plain.close())


QUESTIONS = ["What is the capital of France?", "Give me three colors.", "How do I boil an egg?"]
GREEDY = SamplingParams(max_tokens=24)


def test_drafts_are_verified_exactly(exact: tuple[TransformersEngine, TransformersEngine]) -> None:
    fast, plain = exact
    prompt = [{"role": "user", "content": QUESTIONS[0]}]
    reference = asyncio.run(plain.generate(prompt, GREEDY)).completions[0]
    right = reference.as_draft
    wrong_at_3 = [*right[:3], (right[3] + 1) % 1000, *right[4:]]
    for draft, accepted in ((right, len(right)), (wrong_at_3, 3), ([5, 6, 7], None)):
        result = asyncio.run(fast.generate(prompt, GREEDY, draft=draft))
        assert result.text == reference.text
        assert result.draft_tokens == len(draft)
        if accepted is not None:
            assert result.draft_accepted_tokens == accepted
    sampled = asyncio.run(fast.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=1), draft=right))
    assert sampled.draft_tokens == 0  # drafts are for greedy decoding only


def test_a_repeated_prefix_is_reused(exact: tuple[TransformersEngine, TransformersEngine]) -> None:
    fast, _ = exact
    prompt = [{"role": "user", "content": QUESTIONS[1]}]
    first = asyncio.run(fast.generate(prompt, GREEDY, cache_salt="reuse-test"))
    again = asyncio.run(fast.generate(prompt, GREEDY, cache_salt="reuse-test"))
    other_salt = asyncio.run(fast.generate(prompt, GREEDY, cache_salt="someone-else"))
    assert first.cached_tokens == 0 and other_salt.cached_tokens == 0
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.text == first.text == other_salt.text


def test_mixed_batch_matches_plain_decoding(exact: tuple[TransformersEngine, TransformersEngine]) -> None:
    """One batch holding a draft row, a cached-prefix row and a fresh row gives each its plain greedy answer."""
    fast, plain = exact
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    references = [asyncio.run(plain.generate(p, GREEDY)).completions[0] for p in prompts]
    asyncio.run(fast.generate(prompts[1], GREEDY, cache_salt="mixed"))  # cache prompt 1

    async def together() -> list[str]:
        results = await asyncio.gather(
            fast.generate(prompts[0], GREEDY, draft=references[0].as_draft),
            fast.generate(prompts[1], GREEDY, cache_salt="mixed"),
            fast.generate(prompts[2], GREEDY, cache_salt="fresh"),
        )
        return [r.text for r in results]

    assert asyncio.run(together()) == [r.text for r in references]
