"""The training configuration: one dataclass tree, loaded from YAML, overridable field by field from the CLI.

A run is reproducible from its config file alone: data subsets, splits, sampling and training are all seeded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from server.prompts import PromptFormat


@dataclass
class ModelConfig:
    base: str = "default"  # an embedded model name ("default" = Qwen2.5-Coder-0.5B-Instruct) or a HF checkpoint dir
    # The engine that samples and evaluates: transformers, or llamacpp (the embedded GGUF in llama-server, several
    # times faster on CPUs; adapters are converted to GGUF LoRA for it). SFT always runs in torch.
    generate_engine: str = "transformers"
    generate_dtype: str = "auto"  # transformers engine weights (server/engine/dtypes.py)
    max_batch_size: int = 8  # rows the engine decodes together


@dataclass
class DataConfig:
    # Each: {type: bfcl, category} | {type: nestful, subset} | {type: chat_jsonl, path} | {type: mismatched, of: <one of
    # these>}, optional `limit` (training/data.py: load_source).
    sources: list[dict[str, Any]] = field(default_factory=list)
    heldout: int = 50  # samples held out (never trained on) to score each iteration
    max_train_samples: int | None = None  # the training pool, after the held-out slice
    max_prompt_tokens: int = 1536  # samples whose prompt is longer are dropped (before the split)
    # Calling samples of the pool continued after a tool result, written and filtered by the base model before the
    # first selection (training/followups.py): the answer in words, or the remaining calls. 0: none.
    followups: int = 0
    seed: int = 0


@dataclass
class SelectionConfig:
    k: int = 8  # answers sampled per sample (pass@k), n=k in one engine call
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_differing_values: int = 1  # the paper's ≈; 0 = exact match
    concurrency: int = 2  # samples in flight at once (each is one n=k request)
    seed: int = 0
    # Train on samples whose answer is several calls even when pass@k missed them. A deviation from the paper for one
    # case: a model that never writes two calls in the prompt format (Qwen's native template: 0 of k on every
    # parallel sample) cannot have parallel calls selected into its data, so later iterations could never reach them.
    keep_multi_call: bool = False


@dataclass
class RefineConfig:
    enabled: bool = True
    k: int = 8  # refine answers sampled to check the model can reach the ground truth from its own answer
    temperature: float = 1.0
    max_differing_values: int = 1
    # Distinct wrong answers per sample that become fix candidates (None: all of them, up to selection's k); the
    # cost of the refine step on a slow machine is one k-answer request per candidate.
    max_fixes: int | None = None
    # Distinct right answers per calling sample trained as "keep your answer" (the paper keeps one). More of them weigh
    # keeping a right call against changing it: run 4's iteration 2 had 158 call keeps beside 75 fixes that turn a call
    # into words, and refinement then turned right calls into declines on BFCL (RESULTS.md).
    keep_answers: int = 1
    # The share of samples with nothing to call whose kept fixes (a call into the decline, or into the answer after a
    # tool result) are trained on, chosen by a hash of the sample id; fixes into a call are all trained on.
    no_call_fix_fraction: float = 1.0
    # Where A1 comes from: "sampled" (the answers sampled in selection, at its temperature) or "greedy" (first the
    # model's greedy answer, the A0 that adaptive refinement refines at inference, then the sampled ones): with
    # "greedy" the fixes start from the mistakes inference makes and the keeps from the answers it gives.
    first_answer: str = "sampled"


@dataclass
class SFTConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    global_batch_size: int = 64  # per optimizer step, over all devices (gradient accumulation makes up the rest)
    micro_batch_size: int = 4  # rows per forward pass per device
    epochs: int = 1  # per iteration
    max_seq_len: int = 2048  # longer examples are dropped, never truncated (a cut target teaches garbage)
    # fp32 weights; "bf16": bf16 autocast; "no": plain fp32; "auto": bf16 where the device computes it natively
    mixed_precision: str = "auto"
    checkpoint_every_steps: int = 5  # optimizer steps between resumable checkpoints
    # One row per sample: its direct and refine examples share the prompt, computed once (training/sft.py). The same
    # loss over the same tokens; the batches differ (a global batch holds whole samples).
    share_prefixes: bool = False
    seed: int = 0


@dataclass
class HeldoutConfig:
    max_new_tokens: int = 256
    concurrency: int = 8  # greedy requests in flight (the engine batches them)


@dataclass
class LoopConfig:
    max_iterations: int = 3
    stop_when_not_growing: bool = True  # stop when the selected count does not grow over the previous iteration
    # False: iteration t+1 keeps training iteration t's adapter (the model that selected its data).
    # True: each iteration trains a fresh LoRA on the base model, on the data the latest model selected.
    restart_lora: bool = False


@dataclass
class TrainConfig:
    name: str = "toolace-r"
    output_dir: str = "adapters"  # the adapter lands in <output_dir>/<name>/
    run_dir: str | None = None  # state, data and checkpoints; default $TOOLACE_R_HOME/runs/<name>
    output_dtype: str = "bfloat16"  # of the published adapter weights (training keeps fp32 masters)
    # The prompt the adapter is trained on, and so served with (its manifest says which): `pythonic` (the paper's
    # system prompt, `[f(a=1)]`) or `native` (the model's own chat template with `tools`; targets as fenced JSON call
    # objects, `training.data.render_calls`).
    prompt_format: str = "pythonic"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def override(self, dotted: str, value: Any) -> None:
        """Set one field by its dotted path (`sft.learning_rate`), e.g. from a command-line flag."""
        *parents, leaf = dotted.split(".")
        target: Any = self
        for part in parents:
            target = getattr(target, part)
        if leaf not in {f.name for f in dataclasses.fields(target)}:
            raise KeyError(f"unknown config field {dotted!r}")
        setattr(target, leaf, value)

    def format(self) -> PromptFormat:
        from server.prompts import PromptFormat

        return PromptFormat(self.prompt_format)

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir).expanduser()
        from server.model_store import home_dir

        return home_dir() / "runs" / self.name

    def adapter_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name

    def validate(self) -> None:
        if not self.data.sources:
            raise ValueError("data.sources is empty: name at least one dataset to train on")
        if self.selection.k < 1 or self.refine.k < 1 or self.refine.keep_answers < 1:
            raise ValueError("selection.k, refine.k and refine.keep_answers must be at least 1")
        if not 0.0 <= self.refine.no_call_fix_fraction <= 1.0:
            raise ValueError("refine.no_call_fix_fraction must be between 0 and 1")
        if self.sft.global_batch_size % self.sft.micro_batch_size:
            raise ValueError("sft.global_batch_size must be a multiple of sft.micro_batch_size")
        if self.refine.first_answer not in ("sampled", "greedy"):
            raise ValueError(f"refine.first_answer {self.refine.first_answer!r}: choose sampled or greedy")
        if self.model.generate_engine not in ("transformers", "llamacpp"):
            raise ValueError(f"model.generate_engine {self.model.generate_engine!r}: choose transformers or llamacpp")
        if self.prompt_format not in ("pythonic", "native"):
            raise ValueError(f"prompt_format {self.prompt_format!r}: choose pythonic or native")
        if not self.name or os.sep in self.name:
            raise ValueError(f"name {self.name!r} must be a plain directory name")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise KeyError(f"unknown config field(s): {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        spec = known[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{prefix}{name}.")
        elif isinstance(spec.default, float) and isinstance(value, str):
            kwargs[name] = float(value)  # YAML 1.1 reads "3e-4" as a string
        else:
            kwargs[name] = value
    return cls(**kwargs)


def leaf_fields(config: TrainConfig | None = None) -> list[str]:
    """Every overridable field as a dotted path (`selection.k`), for the CLI's flags."""
    config = config or TrainConfig()

    def walk(node: Any, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            out += walk(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
        return out

    return walk(config, "")
