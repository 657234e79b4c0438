"""LoRA supervised fine-tuning: tokenization with label masking, and a small resumable trainer.

A plain torch loop driven by `accelerate`: the same code runs on one CPU (fp32 weights, bf16 autocast) or on several
GPUs under `accelerate launch` / `torchrun` (DDP; each process takes its share of every global batch).

The loss covers the final assistant turn only: every earlier token (system prompt, question, the model's own first
answer in a refine example, the refine prompt) has the label -100.

With `sft.share_prefixes`, the examples made from one sample (its direct answer, its keep and fix examples) are one
row: their common prompt once, then each example's remainder as a branch that attends to the prompt and to itself
only (a tree attention mask, positions restarting after the prompt). The loss is the same sum over the same tokens;
the prompt, which the refine examples repeat, is computed once.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from training.config import SFTConfig
from training.refine_data import Example

IGNORE_INDEX = -100
CHECKPOINT = "checkpoint"  # the rolling resumable checkpoint inside the work directory


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the final assistant turn
    # A packed row (`pack`): the shared prompt's length and the lengths of the branches after it. () = one sequence.
    prefix: int = 0
    branches: tuple[int, ...] = ()
    examples: int = 1

    @property
    def completion_length(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def positions(self) -> list[int]:
        """Position ids: each branch continues from the end of the shared prompt."""
        if not self.branches:
            return list(range(len(self.input_ids)))
        return list(range(self.prefix)) + [self.prefix + i for n in self.branches for i in range(n)]

    def visible(self) -> torch.Tensor:
        """[n, n] bool: which tokens each token attends to (causal; a branch sees the prompt and itself only)."""
        n = len(self.input_ids)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        start = self.prefix
        for length in self.branches:
            mask[start + length :, start : start + length] = False  # later branches do not see this one
            start += length
        return mask


def pack(rows: Sequence[Encoded]) -> Encoded:
    """Rows that begin with the same prompt as one row: the common prefix once, then each row's remainder as a
    branch. The prefix ends before the token ahead of any row's first label: no label is shared, and every label is
    predicted from a token of its own branch (a branch's first token follows another branch in the packed row)."""
    if len(rows) == 1:
        return rows[0]
    limit = min(len(r.input_ids) - r.completion_length for r in rows) - 1  # labels are one span at the end
    prefix = 0
    while prefix < limit and len({r.input_ids[prefix] for r in rows}) == 1:
        prefix += 1
    return Encoded(
        rows[0].input_ids[:prefix] + [t for r in rows for t in r.input_ids[prefix:]],
        rows[0].labels[:prefix] + [t for r in rows for t in r.labels[prefix:]],
        prefix,
        tuple(len(r.input_ids) - prefix for r in rows),
        len(rows),
    )


def encode_example(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    target: str,
    max_seq_len: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Encoded | None:
    """Tokenize a conversation plus its target answer; None when it exceeds `max_seq_len` (never truncated).

    The prompt is tokenized exactly as the engine does at inference (chat template with the generation prompt, no
    extra special tokens), and the answer separately after it, so that training sees the token boundary that
    generation sees. The answer includes the template's end-of-turn token: the model learns to stop."""
    messages = [dict(m) for m in messages]
    tools = list(tools) if tools else None
    prompt_text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    answer = {"role": "assistant", "content": target}
    full_text = tokenizer.apply_chat_template([*messages, answer], tools=tools, tokenize=False)
    if full_text.startswith(prompt_text):
        completion_text = full_text[len(prompt_text) :].rstrip()  # the newline after end-of-turn is never generated
    else:  # a template that rewrites earlier turns: fall back to the answer plus the eos token
        completion_text = target + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion_text, add_special_tokens=False).input_ids
    if max_seq_len and len(prompt_ids) + len(completion_ids) > max_seq_len:
        return None
    return Encoded(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def plan_batches(
    lengths: Sequence[int], global_batch_size: int, seed: int, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Shuffled global batches of row indices holding `global_batch_size` examples each (a packed row holds
    `sizes[i]` of them; a batch may then hold a few more); the last batch may be smaller."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = [[]]
    held = 0
    for i in order:
        if held >= global_batch_size:
            batches.append([])
            held = 0
        batches[-1].append(i)
        held += sizes[i] if sizes else 1
    return batches if batches[0] else []


def micro_batches(batch: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """A global batch cut into micro-batches of similar lengths (less padding; the gradient sum is the same)."""
    ordered = sorted(batch, key=lambda i: lengths[i])
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def collate(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding: every answer ends at the last position, so the logits needed are the last few only. Packed
    rows get a 4D attention mask (their tree) and `logit_index`, the positions whose logits the loss needs."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, width - n :] = torch.tensor(row.input_ids)
        labels[i, width - n :] = torch.tensor(row.labels)
        attention[i, width - n :] = 1
        positions[i, width - n :] = torch.tensor(row.positions())
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": positions}
    if any(row.branches for row in rows):
        tree = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself: no NaN rows
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            tree[i, width - n :, width - n :] = row.visible()
        batch["attention_mask"] = tree[:, None]
        batch["logit_index"] = ((labels[:, 1:] != IGNORE_INDEX).any(0)).nonzero().flatten()
    return batch


def completion_loss_sum(model: Any, batch: Mapping[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Summed cross-entropy over the label tokens, computing logits for the last `keep` positions only (the
    vocabulary projection over the whole prompt would cost more than it is worth), or at `logit_index` (packed rows)."""
    index = batch.get("logit_index")
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep if index is None else index,
        use_cache=False,
    ).logits
    if index is None:
        logits, labels = logits[:, :-1], batch["labels"][:, -(keep - 1) :]
    else:
        labels = batch["labels"][:, index + 1]  # the logits at position p predict the token at p + 1
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class TrainResult:
    examples: int
    dropped: int  # longer than max_seq_len
    steps: int
    label_tokens: int  # trained-on tokens per epoch
    losses: list[float] = field(default_factory=list)  # mean token loss per optimizer step
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "dropped": self.dropped,
            "steps": self.steps,
            "label_tokens": self.label_tokens,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses,
            "seconds": round(self.seconds, 1),
        }


def train_lora(
    base_dir: Path,
    examples: Sequence[Example],
    config: SFTConfig,
    output_dir: Path,
    work_dir: Path,
    *,
    init_adapter: Path | None = None,
    base_model_name: str | None = None,
    seed_salt: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter (or keep training `init_adapter`) on `examples`; write it to `output_dir` (safetensors).

    Resumes from `work_dir/checkpoint` when a previous attempt was interrupted."""
    from accelerate import Accelerator
    from transformers import set_seed

    started, seed = time.monotonic(), config.seed + seed_salt
    precision = _mixed_precision(config.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    set_seed(seed)
    rows, pad_id = _encode(base_dir, examples, config.max_seq_len, config.share_prefixes)
    lengths, sizes = [len(r.input_ids) for r in rows], [r.examples for r in rows]
    model = _lora_model(base_dir, config, init_adapter, base_model_name)
    schedule = [
        b for e in range(config.epochs) for b in plan_batches(lengths, config.global_batch_size, seed + e, sizes)
    ]
    total = len(schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, config, total)
    trained = sum(sizes)
    result = TrainResult(trained, len(examples) - trained, total, sum(r.completion_length for r in rows))
    checkpoint = work_dir / CHECKPOINT
    start = _resume(checkpoint, model, optimizer, scheduler, result)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=total, initial=start, desc="train", disable=not (progress and accelerator.is_main_process))
    for step in range(start, total):
        batch = schedule[step]
        micros = [[rows[i] for i in micro] for micro in micro_batches(batch, lengths, config.micro_batch_size)]
        label_tokens = sum(rows[i].completion_length for i in batch)
        loss = _accumulate(accelerator, model, micros[rank::world], label_tokens, pad_id)
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(round(loss, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_step:
            on_step(step + 1, loss)
        if (step + 1) % config.checkpoint_every_steps == 0 and step + 1 < total and accelerator.is_main_process:
            _save_checkpoint(accelerator.unwrap_model(model), optimizer, scheduler, step + 1, result.losses, checkpoint)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_adapter(accelerator.unwrap_model(model), output_dir)
        shutil.rmtree(checkpoint, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def _encode(
    base_dir: Path, examples: Sequence[Example], max_seq_len: int, share_prefixes: bool = False
) -> tuple[list[Encoded], int]:
    """The examples that fit `max_seq_len`, tokenized (packed per sample with `share_prefixes`: examples whose ids
    share the part before `#`), and the padding token's id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoded = ((e.id, encode_example(tokenizer, e.messages, e.target, max_seq_len, e.tools)) for e in examples)
    fitting = [(example_id, row) for example_id, row in encoded if row is not None]
    rows = [row for _, row in fitting]
    if share_prefixes:
        groups: dict[str, list[Encoded]] = {}
        for example_id, row in fitting:
            groups.setdefault(example_id.split("#")[0], []).append(row)
        rows = [pack(group) for group in groups.values()]
    if not rows:
        raise ValueError("no training example fits sft.max_seq_len")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return rows, pad_id


def _save_adapter(model: Any, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True, save_embedding_layers=False)


def _lora_model(base_dir: Path, config: SFTConfig, init_adapter: Path | None, base_model_name: str | None) -> Any:
    """The base model in float32 with a new LoRA adapter, or with `init_adapter` to train further."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if base_model_name:  # adapter_config.json names the model, not this machine's cache path
        model.peft_config["default"].base_model_name_or_path = base_model_name
    return model


def _optimizer(params: list[Any], config: SFTConfig, total: int) -> tuple[torch.optim.Optimizer, Any]:
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        # floor, not ceil: warmup makes the first step's learning rate 0, so a run of one or two steps (the tiny
        # config) with ceil would never move the adapter off its zero-initialised B matrices
        num_warmup_steps=math.floor(config.warmup_ratio * total),
        num_training_steps=total,
    )
    return optimizer, scheduler


def _resume(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, result: TrainResult) -> int:
    """Restore an interrupted run's adapter, optimizer, schedule, losses and RNG; the step to go on from (0: none)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (checkpoint / "trainer_state.pt").exists():
        return 0
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.losses = list(state["losses"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _accumulate(accelerator: Any, model: Any, micros: list[list[Encoded]], label_tokens: int, pad_id: int) -> float:
    """Forward and backward over this process's micro-batches of one optimizer step (gradients synced on the
    last); the step's mean loss per label token over every process."""
    world = accelerator.num_processes
    step_loss = torch.zeros(())
    for j, micro in enumerate(micros):
        tensors = {k: v.to(accelerator.device) for k, v in collate(micro, pad_id).items()}
        keep = max(row.completion_length for row in micro) + 1  # ignored for packed rows (their logit_index)
        sync = nullcontext() if j == len(micros) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss_sum = completion_loss_sum(model, tensors, keep)
            # Mean over the global batch's label tokens; DDP averages over processes, hence * world.
            accelerator.backward(loss_sum / label_tokens * world)
        step_loss += loss_sum.detach().float().cpu()
    return float(accelerator.reduce(step_loss.to(accelerator.device), "sum")) / label_tokens


def _mixed_precision(setting: str) -> str:
    """`auto`: bf16 autocast where bfloat16 is native (GPUs, AVX-512 BF16 / AMX CPUs), plain fp32 elsewhere."""
    if setting != "auto":
        return setting
    from server.engine.dtypes import resolve_dtype

    return "bf16" if resolve_dtype("auto") == "bfloat16" else "no"


def _save_checkpoint(model: Any, optimizer: Any, scheduler: Any, step: int, losses: list[float], path: Path) -> None:
    """Write the checkpoint beside the old one, then swap: a crash mid-write leaves the old one intact."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _save_adapter(model, partial)
    state = {
        "step": step,
        "losses": losses,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    torch.save(state, partial / "trainer_state.pt")
    (partial / "progress.json").write_text(json.dumps({"step": step}) + "\n")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)
