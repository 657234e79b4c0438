"""Tokenization with label masking, batching, and the LoRA trainer's resume (SmolLM2-135M)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.prompts import REFINE_PROMPT
from training.config import SFTConfig
from training.refine_data import Example
from training.sft import IGNORE_INDEX, collate, encode_example, micro_batches, plan_batches, train_lora


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(smol_dir)


def test_labels_are_masked_everywhere_but_the_final_assistant_turn(tokenizer) -> None:  # noqa: ANN001
    first_answer, target = "[get_weather(city='Pariss')]", "[get_weather(city='Paris')]"
    messages = [
        {"role": "system", "content": "You call functions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": REFINE_PROMPT},
    ]
    encoded = encode_example(tokenizer, messages, target)
    assert encoded is not None
    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    # One contiguous span at the very end: the final answer and its end-of-turn token.
    assert trained == list(range(len(encoded.labels) - len(trained), len(encoded.labels)))
    assert tokenizer.decode([encoded.labels[i] for i in trained]) == target + "<|im_end|>"
    masked_text = tokenizer.decode(encoded.input_ids[: trained[0]])
    assert first_answer in masked_text and REFINE_PROMPT in masked_text  # the model's own answer is not learned
    assert all(label == IGNORE_INDEX for label in encoded.labels[: trained[0]])
    # The prompt part is tokenized exactly as the engine tokenizes a generation prompt.
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert encoded.input_ids[: trained[0]] == tokenizer(prompt_text, add_special_tokens=False).input_ids


def test_too_long_examples_are_dropped_not_truncated(tokenizer) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "word " * 200}]
    assert encode_example(tokenizer, messages, "[f()]", max_seq_len=50) is None
    assert encode_example(tokenizer, messages, "[f()]", max_seq_len=500) is not None


def test_batches_cover_every_example_once_and_pad_left(tokenizer) -> None:  # noqa: ANN001
    lengths = [5, 9, 3, 7, 2, 8, 4]
    batches = plan_batches(lengths, 3, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(7))
    micro = micro_batches(batches[0], lengths, 2)
    assert [lengths[i] for m in micro for i in m] == sorted(lengths[i] for i in batches[0])
    rows = [encode_example(tokenizer, [{"role": "user", "content": t}], "[f()]") for t in ("hi", "a longer question")]
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    assert batch["labels"][0, -1] == batch["labels"][1, -1]  # both answers end at the last position


def _examples(n: int) -> list[Example]:
    return [
        Example(
            f"e{i}", ({"role": "user", "content": f"Weather in city {i}?"},), f"[get_weather(city='C{i}')]", "direct"
        )
        for i in range(n)
    ]


def test_training_resumes_from_its_checkpoint(smol_dir: Path, tmp_path: Path) -> None:
    config = SFTConfig(global_batch_size=2, micro_batch_size=2, checkpoint_every_steps=1, learning_rate=1e-3)
    examples = _examples(6)  # 3 optimizer steps

    class Crash(Exception):
        pass

    def crash_at_two(step: int, loss: float) -> None:
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        train_lora(
            smol_dir, examples, config, tmp_path / "out", tmp_path / "work", progress=False, on_step=crash_at_two
        )
    assert (tmp_path / "work" / "checkpoint" / "trainer_state.pt").exists()  # step 1 was saved
    steps: list[int] = []
    result = train_lora(
        smol_dir,
        examples,
        config,
        tmp_path / "out",
        tmp_path / "work",
        progress=False,
        on_step=lambda step, loss: steps.append(step),
    )
    assert steps == [2, 3]  # resumed after step 1
    assert len(result.losses) == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "work" / "checkpoint").exists()
