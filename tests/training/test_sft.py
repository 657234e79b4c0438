"""Tokenization with label masking, batching, and the LoRA trainer's resume (SmolLM2-135M)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.prompts import REFINE_PROMPT
from training.config import SFTConfig
from training.refine_data import Example
from training.sft import IGNORE_INDEX, collate, encode_example, micro_batches, plan_batches, train_lora

REFINE_PROMPT_TURN = {"role": "user", "content": REFINE_PROMPT}


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


def test_packed_rows_give_the_loss_and_gradients_of_separate_rows(smol_dir: Path, tokenizer) -> None:  # noqa: ANN001
    """sft.share_prefixes: a sample's direct, keep and fix examples as one row (the prompt once, a branch each) must
    train exactly what the three rows train alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.sft import completion_loss_sum, pack

    question = [{"role": "system", "content": "You call functions."}, {"role": "user", "content": "Weather in Paris?"}]
    right, wrong = "[get_weather(city='Paris')]", "[get_time(city='Paris')]"
    rows = [
        encode_example(tokenizer, question, right),
        encode_example(tokenizer, [*question, {"role": "assistant", "content": right}, REFINE_PROMPT_TURN], right),
        encode_example(tokenizer, [*question, {"role": "assistant", "content": wrong}, REFINE_PROMPT_TURN], right),
    ]
    assert all(rows)
    packed = pack(rows)  # type: ignore[arg-type]
    assert packed.examples == 3 and len(packed.branches) == 3
    assert len(packed.input_ids) < sum(len(r.input_ids) for r in rows)  # type: ignore[union-attr]
    assert packed.completion_length == sum(r.completion_length for r in rows)  # type: ignore[union-attr]

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    weight = model.model.layers[0].self_attn.q_proj.weight

    def loss_and_grad(batches: list[dict[str, torch.Tensor]], keeps: list[int]) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        total = sum(completion_loss_sum(model, b, k) for b, k in zip(batches, keeps, strict=True))
        total.backward()  # type: ignore[union-attr]
        return float(total.detach()), weight.grad.clone()  # type: ignore[union-attr]

    alone = loss_and_grad([collate([r], 0) for r in rows], [r.completion_length + 1 for r in rows])  # type: ignore[union-attr]
    together = loss_and_grad([collate([packed, rows[0]], 0)], [0])  # type: ignore[list-item]
    # the batch also holds the direct example alone (left-padded beside the packed row): counted twice
    direct = loss_and_grad([collate([rows[0]], 0)], [rows[0].completion_length + 1])  # type: ignore[union-attr]
    assert together[0] == pytest.approx(alone[0] + direct[0], rel=1e-4)
    difference = (together[1] - alone[1] - direct[1]).abs().max() / together[1].abs().max()
    assert difference < 1e-3, float(difference)  # float32 summation order: left padding alone moves it ~2e-4
    # in any order: the direct answer's first token is predicted from the prompt, not from another branch's end
    reordered = pack(rows[::-1])  # type: ignore[arg-type]
    assert loss_and_grad([collate([reordered], 0)], [0])[0] == pytest.approx(alone[0], rel=1e-4)


def test_batches_of_packed_rows_hold_the_global_batch_in_examples() -> None:
    sizes = [3, 1, 2, 1, 1, 3]
    batches = plan_batches([10] * 6, 4, seed=0, sizes=sizes)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(sum(sizes[i] for i in b) >= 4 for b in batches[:-1])
    assert all(sum(sizes[i] for i in b[:-1]) < 4 for b in batches)


def test_training_on_packed_rows_counts_examples_not_rows(smol_dir: Path, tmp_path: Path) -> None:
    """share_prefixes end to end: 3 samples x (direct + a refine example) are 3 rows; a global batch of 2 examples
    is one row per step, and every example is counted as trained."""
    examples = []
    for e in _examples(3):
        refine = (*e.messages, {"role": "assistant", "content": e.target}, REFINE_PROMPT_TURN)
        examples += [e, Example(f"{e.id}#keep", refine, e.target, "refine_stop")]
    config = SFTConfig(global_batch_size=2, micro_batch_size=1, share_prefixes=True, learning_rate=1e-3)
    result = train_lora(smol_dir, examples, config, tmp_path / "out", tmp_path / "work", progress=False)
    assert (result.examples, result.dropped, result.steps) == (6, 0, 3)
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
