"""The ToolACE-R training loop: select → build refine data → train → evaluate, repeated from the new model.

Iteration t selects with the model trained in iteration t-1 (the base model for t=1). By default the LoRA of
iteration t starts from iteration t-1's adapter (`loop.restart_lora: false`): "repeat with the new model" read
literally, and cheaper than retraining from scratch on CPU. The loop stops when the selected count stops growing or
at `loop.max_iterations`; the adapter of the last trained iteration is published.

Every step records its result in `<run_dir>/state.json` when it finishes, and the long steps (sampling, training)
keep partial progress on disk, so a crashed run restarts from where it stopped: run the same command again.
Under `accelerate launch` / `torchrun` the main process samples and evaluates; every process trains.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.engine.base import encode_chat
from training.config import TrainConfig
from training.data import Sample, load_source, split
from training.refine_data import Example, build_refine_examples, direct_examples, refine_counts

log = logging.getLogger("training")

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
PLOT_FILE = "progress.png"
# What an iteration's SFT (and its checkpoint) trained on: its examples.jsonl's sha256, plus " share_prefixes" if packed
TRAINED_ON_FILE = "trained_on.sha256"
MANIFEST_FORMAT = "toolace-r-adapter/1"
# Fields that may change between a crash and its resume without invalidating what was done.
_RESUMABLE_CHANGES = {
    "name",  # the published adapter's name; the run directory is the same one when this is reached
    "output_dir",
    "run_dir",
    "loop.max_iterations",
    "model.max_batch_size",
    "model.generate_engine",  # the same model sampled by another backend: records already made stay valid
    "selection.keep_multi_call",  # read when an iteration's examples are built; built ones stay as they were
    "selection.concurrency",
    "eval.concurrency",
    "sft.checkpoint_every_steps",
    "refine.max_fixes",  # a budget: refine records already made keep every candidate they were made with
    # Read when an iteration's examples are built from its records; examples already built stay as they were.
    "refine.keep_answers",
    "refine.no_call_fix_fraction",
    # Read when a sample's refine record is made (as max_fixes): records already made keep their first answers.
    "refine.first_answer",
    # Gradient accumulation sums the same per-token losses whatever the micro batch: lowering it after an
    # out-of-memory kill changes memory, not the result (up to float summation order).
    "sft.micro_batch_size",
    # The same loss over the same tokens; an SFT in progress restarts when it changes (`TRAINED_ON_FILE`).
    "sft.share_prefixes",
    # The same computation at the precision this machine runs fastest (bfloat16 only where the CPU has it natively):
    # sessions land on different CPUs, and samples or steps already made stay valid.
    "model.generate_dtype",
    "sft.mixed_precision",
}


class ConfigMismatch(Exception):
    """The run directory holds a run with another config: resuming it would mix two experiments."""


@dataclass
class RunData:
    train: list[Sample]
    heldout: list[Sample]
    dropped_too_long: int
    per_source: dict[str, int] = field(default_factory=dict)


def load_data(config: TrainConfig, tokenizer: Any) -> RunData:
    """Every source, minus prompts longer than `data.max_prompt_tokens`, split into training pool and held-out."""
    samples: list[Sample] = []
    for source in config.data.sources:
        samples += load_source(source)
    kept = fitting(samples, config, tokenizer)
    parts = split(kept, config.data.heldout, config.data.max_train_samples, config.data.seed)
    per_source: dict[str, int] = {}
    for s in parts.train:
        per_source[s.source] = per_source.get(s.source, 0) + 1
    return RunData(parts.train, parts.heldout, len(samples) - len(kept), per_source)


def fitting(samples: list[Sample], config: TrainConfig, tokenizer: Any) -> list[Sample]:
    """The samples whose prompt, in the run's format, is at most `data.max_prompt_tokens` long."""
    fmt = config.format()

    def tokens(sample: Sample) -> int:
        prompt = sample.prompt(fmt)
        return len(encode_chat(tokenizer, prompt.messages, prompt.tools))

    return [s for s in samples if tokens(s) <= config.data.max_prompt_tokens]


class Run:
    def __init__(
        self,
        config: TrainConfig,
        *,
        progress: bool = True,
        fresh: bool = False,
        engine_factory: Callable[[Path], Any] | None = None,
        trainer: Callable[..., Any] | None = None,
    ) -> None:
        """`engine_factory(base_dir)` and `trainer` (`sft.train_lora`'s signature) replace the real ones in tests."""
        from accelerate import PartialState

        config.validate()
        self.config = config
        self._engine_factory = engine_factory
        self._trainer = trainer
        self.progress = progress
        self.dist = PartialState()
        self.dir = config.resolved_run_dir()
        if fresh and self.dist.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dist.wait_for_everyone()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self._engine: Any = None
        self._loaded: set[str] = set()
        self.base_dir: Path  # the base model's directory, resolved (and prepared) by `run`

    # ---- state ----

    def _load_state(self) -> dict[str, Any]:
        path = self.dir / STATE_FILE
        current = self.config.to_dict()
        if not path.exists():
            return {"config": current, "iterations": [], "created": _now()}
        state = json.loads(path.read_text())
        differing = [k for k in _diff(state["config"], current) if k not in _RESUMABLE_CHANGES]
        if differing:
            raise ConfigMismatch(
                f"{self.dir} holds a run with another config (differs in: {', '.join(differing)}); "
                "pass --fresh to start over, or another --name / --run-dir"
            )
        state["config"] = current
        return state

    def _save_state(self) -> None:
        if not self.dist.is_main_process:
            return
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    def _sync_state(self) -> None:
        """After the main process finished a step, every process reads what it recorded."""
        self.dist.wait_for_everyone()
        if not self.dist.is_main_process:
            self.state = json.loads((self.dir / STATE_FILE).read_text())

    def _iteration(self, t: int) -> dict[str, Any]:
        while len(self.state["iterations"]) < t:
            self.state["iterations"].append({"iteration": len(self.state["iterations"]) + 1})
        return self.state["iterations"][t - 1]

    # ---- engine ----

    def _engine_for(self, adapter: Path | None) -> tuple[Any, str | None]:
        """The sampling engine (created once) with `adapter` loaded; returns it and the adapter's name."""
        from server import model_store
        from server.engine import create_engine

        model = self.config.model
        if self._engine is None and self._engine_factory is not None:
            self._engine = self._engine_factory(self.base_dir)
        elif self._engine is None and model.generate_engine == "llamacpp":
            gguf = model_store.gguf_path(model.base, progress=self.progress)
            # No prompt lookup: sampled answers rarely repeat their prompt, and each rejected draft is a batch of
            # 48 tokens per sequence (4 samples x n=4 on 2 cores: 142 s with it, 101 s without; BENCHMARKS.md).
            self._engine = create_engine(
                "llamacpp",
                str(self.base_dir),
                gguf=gguf,
                max_batch_size=model.max_batch_size,
                prompt_lookup=False,
                progress=self.progress,
            )
        elif self._engine is None:
            self._engine = create_engine(
                model.generate_engine,
                str(self.base_dir),
                max_batch_size=model.max_batch_size,
                dtype=model.generate_dtype,
                prefix_cache_tokens=0,
            )
        if adapter is None:
            return self._engine, None
        name = adapter.parent.name  # iter_<t>
        if name not in self._loaded:
            asyncio.run(self._engine.load_adapter(name, adapter))
            self._loaded.add(name)
        return self._engine, name

    def _close_engine(self) -> None:
        if self._engine is not None:
            asyncio.run(self._engine.close())
            self._engine = None
            self._loaded.clear()

    # ---- the loop ----

    def run(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from server import model_store

        cfg = self.config
        self.base_dir = model_store.resolve(cfg.model.base, progress=self.progress)
        tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        data = load_data(cfg, tokenizer)
        followups = self.state.get("data", {}).get("followups")  # counted once, when they were made
        heldout_sha = _ids_sha256(data.heldout)
        if self.state.get("data", {}).get("heldout_ids_sha256", heldout_sha) != heldout_sha:
            # A loader changed between sessions can move the held-out slice: the old scores are of other questions.
            log.info("the held-out slice changed: its scores are computed again")
            self.state.pop("baseline", None)
            for it in self.state["iterations"]:
                it.pop("heldout", None)
        self.state["data"] = {
            "train_pool": len(data.train),
            "heldout": len(data.heldout),
            "dropped_too_long": data.dropped_too_long,
            "train_per_source": data.per_source,
            "heldout_ids_sha256": heldout_sha,
        } | ({"followups": followups} if followups else {})
        log.info(
            "data: %d to select from, %d held out, %d dropped (prompt too long)",
            len(data.train),
            len(data.heldout),
            data.dropped_too_long,
        )
        self._save_state()
        try:
            if cfg.data.followups:
                data.train += self._followups(data.train, tokenizer)
            if "baseline" not in self.state:
                self.state["baseline"] = self._main_only(lambda: self._evaluate(data.heldout, None, "baseline"))
                self._commit()
            log.info("baseline (base model) on the held-out slice: %s", self.state["baseline"])
            self._iterate(data)
        finally:
            self._close_engine()
        return self.publish()

    def _iterate(self, data: RunData) -> None:
        cfg = self.config
        previous: dict[str, Any] | None = None
        for t in range(1, cfg.loop.max_iterations + 1):
            it = self._iteration(t)
            if it.get("done"):
                previous = self._heldout(t, data)  # scored again if its score was of an old held-out slice
                continue
            if it.get("stopped"):
                return
            with _iteration_log(self.dir / f"iter_{t}" / "log.txt"):
                self._one_iteration(t, it, previous, data)
            if it.get("stopped"):
                return
            previous = it
        self.state["stop_reason"] = self.state.get("stop_reason") or "max_iterations"
        self._save_state()

    def _one_iteration(self, t: int, it: dict[str, Any], previous: dict[str, Any] | None, data: RunData) -> None:
        cfg = self.config
        work = self.dir / f"iter_{t}"
        adapter = Path(previous["adapter"]) if previous else None
        log.info("iteration %d: selecting with %s", t, adapter or "the base model")

        if "selected" not in it:
            it.update(self._main_only(lambda: self._select(t, data.train, adapter, work)))
            self._commit()
            it = self._iteration(t)
        log.info("iteration %d: %d of %d selected (pass@%d)", t, it["selected"], len(data.train), cfg.selection.k)
        # Counts of two pools say nothing about the model: a run continued on new data (RESULTS.md, iteration 3)
        # compares only iterations that selected from the same samples.
        if (
            cfg.loop.stop_when_not_growing
            and previous is not None
            and previous.get("pool_ids_sha256") == it.get("pool_ids_sha256")
            and it["selected"] <= previous["selected"]
        ):
            it["stopped"] = True
            self.state["stop_reason"] = f"selected count stopped growing ({previous['selected']} → {it['selected']})"
            log.info("iteration %d: %s; stopping", t, self.state["stop_reason"])
            self._save_state()
            return

        if "refine" not in it:
            it["refine"] = self._main_only(lambda: self._refine(t, data.train, adapter, work))
            self._commit()
            it = self._iteration(t)
        log.info("iteration %d: refine examples %s", t, it["refine"])

        if "train" not in it:
            self._train_step(t, it, adapter, work)
            self._commit()
            it = self._iteration(t)

        it = self._heldout(t, data)
        log.info("iteration %d: held-out %s (baseline %s)", t, it["heldout"], self.state["baseline"])
        it["done"] = True
        self._save_state()
        if self.dist.is_main_process:
            self._plot()

    def _heldout(self, t: int, data: RunData) -> dict[str, Any]:
        """Iteration `t` with its adapter's held-out score, evaluated unless it is there."""
        it = self._iteration(t)
        if "heldout" not in it:
            it["heldout"] = self._main_only(lambda: self._evaluate(data.heldout, Path(it["adapter"]), f"iter_{t}"))
            self._commit()
        return self._iteration(t)

    def _train_step(self, t: int, it: dict[str, Any], adapter: Path | None, work: Path) -> None:
        from server import model_store

        examples_file = work / "examples.jsonl"
        examples = [Example.from_json(json.loads(line)) for line in examples_file.open()]
        init = None if self.config.loop.restart_lora or adapter is None else adapter
        started = time.monotonic()
        done_file = work / "train_result.json"  # written after the adapter: a crash right after keeps it
        # What this iteration trained (or began to: the checkpoint) is reused only when it trained on these very
        # examples; a redone iteration (new data, same directory) starts its SFT over.
        # Packed rows train the same loss in other batches: switching sft.share_prefixes restarts this SFT too.
        packing = " share_prefixes" if self.config.sft.share_prefixes else ""
        stamp, digest = work / TRAINED_ON_FILE, model_store.file_sha256(examples_file) + packing
        if self.dist.is_main_process and (not stamp.exists() or stamp.read_text().strip() != digest):
            done_file.unlink(missing_ok=True)
            shutil.rmtree(work / "train", ignore_errors=True)
            stamp.write_text(digest + "\n")
        self.dist.wait_for_everyone()
        if done_file.exists():
            it["train"] = json.loads(done_file.read_text())
        else:
            # held-out answers of an adapter this iteration trained before (a redone iteration) are not this one's
            (work / "heldout.jsonl").unlink(missing_ok=True)
            it["train"] = _train(self, examples, work, init, t).to_json()
            if self.dist.is_main_process:
                done_file.write_text(json.dumps(it["train"]) + "\n")
        it["adapter"] = str(work / "adapter")
        log.info(
            "iteration %d: trained %d steps on %d examples in %.0f s, loss %s → %s",
            t,
            it["train"]["steps"],
            it["train"]["examples"],
            time.monotonic() - started,
            it["train"]["first_loss"],
            it["train"]["final_loss"],
        )

    def _commit(self) -> None:
        """Save what the main process recorded in a step; every process reads it back."""
        self._save_state()
        self._sync_state()

    def _main_only(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return fn() if self.dist.is_main_process else {}

    # ---- steps ----

    def _select(self, t: int, pool: list[Sample], adapter: Path | None, work: Path) -> dict[str, Any]:
        from training.select import select

        engine, name = self._engine_for(adapter)
        records = asyncio.run(
            select(
                engine,
                pool,
                self.config.selection,
                work / "select.jsonl",
                fmt=self.config.format(),
                adapter=name,
                iteration=t,
                progress=self.progress,
            )
        )
        selected = [r for r in records.values() if r["selected"]]
        return {
            "selected": len(selected),
            "pool": len(pool),
            "pool_ids_sha256": _ids_sha256(pool),
            "pass_at_1": round(sum(r["matched"][0] for r in records.values()) / max(1, len(records)), 4),
        }

    def _refine(self, t: int, pool: list[Sample], adapter: Path | None, work: Path) -> dict[str, Any]:
        from training.resumable import read_records

        selection = read_records(work / "select.jsonl")
        chosen = [s for s in pool if selection[s.id]["selected"]]
        examples = direct_examples(chosen, self.config.format())
        summary: dict[str, Any] = {"direct": len(examples), "refine_stop": 0, "refine_fix": 0, "refine_fix_rejected": 0}
        if self.config.selection.keep_multi_call:
            kept = [s for s in pool if not selection[s.id]["selected"] and len(s.ground_truth) > 1]
            examples += direct_examples(kept, self.config.format())
            summary["kept_multi_call"] = len(kept)
        if self.config.refine.enabled:
            engine, name = self._engine_for(adapter)
            examples += asyncio.run(
                build_refine_examples(
                    engine,
                    chosen,
                    selection,
                    self.config.refine,
                    self.config.selection,
                    work / "refine.jsonl",
                    fmt=self.config.format(),
                    adapter=name,
                    iteration=t,
                    progress=self.progress,
                )
            )
            records = read_records(work / "refine.jsonl")  # may hold samples a changed pool no longer has
            summary |= refine_counts({s.id: records[s.id] for s in chosen})
        summary["trained"] = dict(Counter(example.kind for example in examples))  # after refine's weighing
        tmp = work / "examples.jsonl.tmp"
        with tmp.open("w") as sink:
            for example in examples:
                sink.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
        tmp.replace(work / "examples.jsonl")
        return summary

    def _followups(self, pool: list[Sample], tokenizer: Any) -> list[Sample]:
        """The follow-up samples (made once, with the base model, before iteration 1; cached in the run directory)."""
        from training.followups import followup_samples, write_followups

        path, count = self.dir / "followups.jsonl", self.config.data.followups
        if self.dist.is_main_process:
            engine, _ = self._engine_for(None)
            asyncio.run(write_followups(engine, pool, count, path, progress=self.progress))
        self.dist.wait_for_everyone()
        kept = fitting(followup_samples(pool, count, path), self.config, tokenizer)
        kinds = dict(Counter(sample.source.rsplit(":", 1)[-1] for sample in kept))
        self.state["data"]["followups"] = {"asked": count, **kinds}
        self._save_state()
        log.info("follow-up samples added to the pool: %s", kinds)
        return kept

    def _evaluate(self, heldout: list[Sample], adapter: Path | None, label: str) -> dict[str, Any]:
        from training.heldout import evaluate

        engine, name = self._engine_for(adapter)
        path = self.dir / label / "heldout.jsonl" if label == "baseline" else adapter.parent / "heldout.jsonl"  # type: ignore[union-attr]
        return asyncio.run(
            evaluate(
                engine,
                heldout,
                self.config.eval,
                path,
                fmt=self.config.format(),
                adapter=name,
                desc=f"eval {label}",
                progress=self.progress,
            )
        )

    # ---- output ----

    def _plot(self) -> None:
        from training.plot import plot_progress

        try:
            plot_progress(self.state, self.dir / PLOT_FILE)
        except Exception:  # a missing matplotlib must not fail a training run
            log.warning("could not draw %s", PLOT_FILE, exc_info=True)

    def publish(self) -> dict[str, Any]:
        """Publish the last trained iteration's adapter to `<output_dir>/<name>/` with its manifest."""
        done = [it for it in self.state["iterations"] if it.get("done")]
        if not done:
            raise RuntimeError("no iteration finished training: nothing to publish")
        from server import model_store

        manifest = self.manifest(done[-1])
        if self.dist.is_main_process:
            out = self.config.adapter_dir()
            out.mkdir(parents=True, exist_ok=True)
            source = Path(done[-1]["adapter"])
            shutil.copyfile(source / "adapter_config.json", out / "adapter_config.json")
            _publish_weights(
                source / "adapter_model.safetensors", out / "adapter_model.safetensors", self.config.output_dtype
            )
            manifest["adapter"]["sha256"] = model_store.file_sha256(out / "adapter_model.safetensors")
            (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            self._plot()
            if (self.dir / PLOT_FILE).exists():
                shutil.copyfile(self.dir / PLOT_FILE, out / PLOT_FILE)
            self.state["published"] = {"path": str(out), "iteration": done[-1]["iteration"], "at": _now()}
            self._save_state()
            log.info("adapter written to %s (iteration %d)", out, done[-1]["iteration"])
        return manifest

    def manifest(self, final: dict[str, Any]) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        from server import model_store

        cfg = self.config
        base_name = model_store.model_name(cfg.model.base)
        source_file = self.base_dir / model_store.SOURCE_FILE
        source = json.loads(source_file.read_text()) if source_file.exists() else None
        return {
            "format": MANIFEST_FORMAT,
            "name": cfg.name,
            "created": _now(),
            "base_model": {
                "name": base_name,
                "sha256": model_store.base_sha256(self.base_dir),
                "sha256_of": source.get("gguf") if source else "model.safetensors",
                "source": source,
            },
            "adapter": {
                "file": "adapter_model.safetensors",
                "iteration": final["iteration"],
                "lora": {"r": cfg.sft.lora_r, "alpha": cfg.sft.lora_alpha, "target_modules": cfg.sft.target_modules},
            },
            "prompt_format": cfg.prompt_format,
            "method": "ToolACE-R model-aware iterative training: pass@k selection, self-refine data, LoRA SFT",
            "config": cfg.to_dict(),
            "data": self.state.get("data"),
            "baseline": self.state.get("baseline"),
            "iterations": [
                {key: it.get(key) for key in ("iteration", "selected", "pool", "pass_at_1", "refine", "heldout")}
                | {"train": {k: v for k, v in (it.get("train") or {}).items() if k != "losses"}}
                for it in self.state["iterations"]
                if "selected" in it
            ],
            "stop_reason": self.state.get("stop_reason"),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }


def _train(run: Run, examples: list[Example], work: Path, init: Path | None, t: int) -> Any:
    from server import model_store
    from training.sft import train_lora

    base_name = model_store.model_name(run.config.model.base)
    return (run._trainer or train_lora)(
        run.base_dir,
        examples,
        run.config.sft,
        work / "adapter",
        work / "train",
        init_adapter=init,
        base_model_name=base_name,
        seed_salt=t,
        progress=run.progress,
    )


def _publish_weights(source: Path, target: Path, dtype: str) -> None:
    """Copy the adapter weights, cast to `dtype` (bf16 halves the file; the engine runs bf16 anyway)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    if dtype != "float32":
        cast = getattr(torch, dtype)
        tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, target, metadata={"format": "pt"})


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _ids_sha256(samples: list[Sample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def _iteration_log(path: Path) -> Iterator[None]:
    """Mirror the `training` log into one file per iteration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def train(config: TrainConfig, *, progress: bool = True, fresh: bool = False, **hooks: Any) -> dict[str, Any]:
    """Run (or resume) a training run and publish its adapter; returns the manifest."""
    return Run(config, progress=progress, fresh=fresh, **hooks).run()
