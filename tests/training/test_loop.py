"""The loop's bookkeeping with a scripted engine and a stub trainer: resume after a crash, stop rule, manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from training.config import TrainConfig
from training.data import load_source
from training.loop import ConfigMismatch, train
from training.sft import TrainResult

SOURCE = {"type": "bfcl", "category": "live_parallel", "limit": 8}


def _config(tmp_path: Path) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "name": "loop-test",
            "output_dir": str(tmp_path / "adapters"),
            "run_dir": str(tmp_path / "run"),
            "model": {"base": "smollm2-135m-instruct"},
            "data": {"sources": [SOURCE], "heldout": 2, "max_prompt_tokens": 4096},
            "selection": {"k": 2},
            "refine": {"k": 2},
            "loop": {"max_iterations": 3},
        }
    )


def _oracle_engine(scripted):  # noqa: ANN001, ANN202
    """Answers every question with its ground truth (so every sample is selected, every first answer is right)."""
    targets = {s.query: s.target() for s in load_source(SOURCE)}
    return scripted(lambda messages, params: [targets[messages[1]["content"]]] * params.n)


class Crash(Exception):
    pass


def _edit_state_after_one_iteration(scripted, tmp_path: Path, edit: Callable[[dict[str, Any]], None]):  # noqa: ANN001, ANN202
    """One iteration run with the oracle engine, then its state.json edited by hand; returns the engine and config."""
    engine = _oracle_engine(scripted)
    config = _config(tmp_path)
    config.loop.max_iterations = 1
    train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))
    state_file = tmp_path / "run" / "state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    return engine, config


def _stub_trainer(calls: list[Path | None], crash: bool = False):  # noqa: ANN202
    def trainer(base_dir: Path, examples: Any, config: Any, output_dir: Path, work_dir: Path, **kw: Any) -> Any:
        calls.append(kw.get("init_adapter"))
        if crash:
            raise Crash
        output_dir.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(2, dtype=torch.float32)}, output_dir / "adapter_model.safetensors")
        (output_dir / "adapter_config.json").write_text("{}")
        return TrainResult(len(examples), 0, 1, 10, [1.0])

    return trainer


def test_resume_after_a_crash_redoes_nothing_finished(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    engine = _oracle_engine(scripted)
    config = _config(tmp_path)
    with pytest.raises(Crash):
        train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([], crash=True))
    sampled = len(engine.calls)  # baseline (2 greedy) + selection (6 with n=2); no refine check: all answers right
    assert sampled == 2 + 6
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["iterations"][0]["selected"] == 6 and "train" not in state["iterations"][0]

    trained: list[Path | None] = []
    manifest = train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer(trained))
    # Resumed at training: no baseline or selection again; then held-out eval (2), iteration 2's selection (6).
    assert len(engine.calls) - sampled == 2 + 6
    assert trained == [None]  # iteration 1 only: iteration 2 selected no more (6 → 6) and the loop stopped
    assert "stopped growing" in manifest["stop_reason"]
    assert [it["selected"] for it in manifest["iterations"]] == [6, 6]
    assert manifest["iterations"][0]["refine"] == {
        "direct": 6,
        "refine_stop": 6,
        "refine_fix": 0,
        "refine_fix_rejected": 0,
        "trained": {"direct": 6, "refine_stop": 6},
    }
    assert manifest["iterations"][0]["heldout"] == {"n": 2, "exact": 1.0, "approx": 1.0}
    out = tmp_path / "adapters" / "loop-test"
    assert json.loads((out / "manifest.json").read_text())["base_model"]["name"] == "smollm2-135m-instruct"
    assert (out / "adapter_model.safetensors").exists() and (out / "progress.png").exists()
    examples = (tmp_path / "run" / "iter_1" / "examples.jsonl").read_text().splitlines()
    assert len(examples) == 12


def test_a_changed_config_is_not_mixed_into_an_old_run(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    engine = _oracle_engine(scripted)
    train(_config(tmp_path), progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))
    changed = _config(tmp_path)
    changed.selection.k = 4
    with pytest.raises(ConfigMismatch, match="selection.k"):
        train(changed, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))
    more = _config(tmp_path)
    more.loop.max_iterations = 5  # allowed: the run already stopped on its own rule
    train(more, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))


def test_multi_call_samples_are_kept_when_asked_even_if_never_selected(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    """A model that never writes two calls (here: always one call) selects no parallel sample; keep_multi_call
    trains on them as given, and only on those."""
    samples = load_source(SOURCE)
    assert all(len(s.ground_truth) > 1 for s in samples)
    engine = scripted(lambda messages, params: ["[f(a=1)]"] * params.n)
    config = _config(tmp_path)
    config.selection.keep_multi_call = True
    config.loop.max_iterations = 1
    manifest = train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))
    (iteration,) = manifest["iterations"]
    assert iteration["selected"] == 0 and iteration["refine"]["kept_multi_call"] == 6
    examples = (tmp_path / "run" / "iter_1" / "examples.jsonl").read_text().splitlines()
    assert len(examples) == 6


def test_an_iteration_redone_on_other_examples_trains_again(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    """An iteration redone in its directory (state reset by hand, new data) must not reuse the SFT result or the
    checkpoint of the examples it trained on before (seen once: an adapter 'trained in 0 s' on the old examples);
    with the same examples, the finished SFT is reused."""
    engine = _oracle_engine(scripted)
    config = _config(tmp_path)
    config.loop.max_iterations = 1
    trained: list[Path | None] = []
    train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer(trained))
    state_file, work = tmp_path / "run" / "state.json", tmp_path / "run" / "iter_1"

    def redo(examples: list[str]) -> None:
        state = json.loads(state_file.read_text())
        for key in ("train", "heldout", "done", "adapter"):
            state["iterations"][0].pop(key, None)
        for key in ("published", "stop_reason"):
            state.pop(key, None)
        state_file.write_text(json.dumps(state))
        (work / "examples.jsonl").write_text("".join(line + "\n" for line in examples))
        (work / "train" / "checkpoint").mkdir(parents=True, exist_ok=True)  # as an interrupted SFT leaves it
        train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer(trained))

    examples = (work / "examples.jsonl").read_text().splitlines()
    redo(examples)
    assert len(trained) == 1 and (work / "train" / "checkpoint").exists()
    redo(examples[:-1])
    assert len(trained) == 2, "other examples: trained again"
    assert not (work / "train" / "checkpoint").exists(), "the old examples' checkpoint is not resumed"
    assert json.loads((work / "train_result.json").read_text())["examples"] == len(examples) - 1
    # the same examples packed (sft.share_prefixes: other batches): a resumable change that trains again
    config.sft.share_prefixes = True
    redo(examples[:-1])
    assert len(trained) == 3 and not (work / "train" / "checkpoint").exists()


def test_scores_of_an_old_held_out_slice_are_computed_again(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    """A change in how sources load (code, not config) can move the held-out slice; the baseline and every
    iteration's held-out score then belong to other questions and are computed again on resume."""

    def other_slice(state: dict[str, Any]) -> None:
        state["data"]["heldout_ids_sha256"] = "0" * 64  # as if the slice had been other samples
        state["baseline"] = state["iterations"][0]["heldout"] = {"n": 2, "exact": 0.0, "approx": 0.0}

    engine, config = _edit_state_after_one_iteration(scripted, tmp_path, other_slice)
    for path in (tmp_path / "run").rglob("heldout.jsonl"):
        path.unlink()  # the old slice's answers: kept records would be reused for the same ids
    calls = len(engine.calls)
    manifest = train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer([]))
    assert len(engine.calls) - calls == 2 + 2  # the baseline and iteration 1, 2 greedy answers each
    assert manifest["baseline"] == manifest["iterations"][0]["heldout"] == {"n": 2, "exact": 1.0, "approx": 1.0}


def test_selected_counts_of_two_pools_are_not_compared(scripted, tmp_path: Path) -> None:  # noqa: ANN001
    """A run continued on new data (an iteration seeded from a run on other samples) trains the next iteration even
    when it selects no more: the stop rule compares counts only on the same pool."""

    def other_pool(state: dict[str, Any]) -> None:
        assert state["iterations"][0]["pool_ids_sha256"]
        state["iterations"][0]["pool_ids_sha256"] = "0" * 64  # as if iteration 1 had selected from other samples

    engine, config = _edit_state_after_one_iteration(scripted, tmp_path, other_pool)
    config.loop.max_iterations = 2
    trained: list[Path | None] = []
    manifest = train(config, progress=False, engine_factory=lambda _: engine, trainer=_stub_trainer(trained))
    assert [it["selected"] for it in manifest["iterations"]] == [6, 6]
    assert trained == [tmp_path / "run" / "iter_1" / "adapter"], "iteration 2 trained, from iteration 1's adapter"
    assert manifest["stop_reason"] == "max_iterations"
