"""Checks every Engine backend must pass, called from each backend's test module with its own engine."""

from __future__ import annotations

import asyncio

from server.engine import Engine, SamplingParams

HELLO = [{"role": "user", "content": "Say hello in three words."}]


def check_generate_from_messages_and_from_token_ids(engine: Engine) -> None:
    """The same answer from messages and from their token ids; the end-of-turn token reported apart from the text's
    tokens, which decode to the text. (`engine.tokenizer`: the backend's Hugging Face tokenizer.)"""
    params = SamplingParams(max_tokens=24)
    from_messages = asyncio.run(engine.generate(HELLO, params))
    from_ids = asyncio.run(engine.generate(engine.encode_chat(HELLO), params))
    assert from_messages.text == from_ids.text and from_messages.text.strip()
    assert from_messages.prompt_tokens == len(engine.encode_chat(HELLO))
    completion = from_messages.completions[0]
    assert completion.finish_reason == "stop" and completion.stop_token_id is not None
    assert completion.stop_token_id not in completion.token_ids
    tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    assert tokenizer.decode(completion.token_ids, skip_special_tokens=True) == completion.text


def check_max_tokens_and_stop(engine: Engine) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    cut = asyncio.run(engine.generate(story, SamplingParams(max_tokens=7)))
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 7)
    full = asyncio.run(engine.generate(story, SamplingParams(max_tokens=30))).text
    stop_word = full.split()[3]
    stopped = asyncio.run(engine.generate(story, SamplingParams(max_tokens=30, stop=(stop_word,))))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop_word)]


def check_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(engine: Engine) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, n=4, seed=7)
    first = asyncio.run(engine.generate(HELLO, params))
    second = asyncio.run(engine.generate(HELLO, params))
    assert len(first.completions) == 4
    assert [c.text for c in first.completions] == [c.text for c in second.completions]
    assert len({c.text for c in first.completions}) > 1
    assert first.prompt_tokens == len(engine.encode_chat(HELLO))  # the prompt counts once, not n times


def check_logprobs(engine: Engine) -> None:
    """One log-probability per output token (the end-of-turn token excluded), each with its top alternatives;
    under greedy decoding the chosen token is the most likely one. Without asking, there are none."""
    generation = asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=12, logprobs=3)))
    completion = generation.completions[0]
    assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids) > 0
    for entry in completion.logprobs:
        assert len(entry.top) == 3 and entry.logprob <= 0.0
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert abs(entry.logprob - entry.top[0][1]) < 1e-3  # a likeliest token (bf16 ties are common)
    assert "".join(entry.token for entry in completion.logprobs) == completion.text
    plain = asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=12)))
    assert plain.completions[0].logprobs is None and plain.text == completion.text
    sampled = asyncio.run(engine.generate(HELLO, SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=0)))
    assert all(entry.top == () for entry in sampled.completions[0].logprobs or [None])
