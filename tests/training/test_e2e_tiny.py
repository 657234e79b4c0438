"""The CI proof: the tiny config end to end (selection, refine data, training, adapter written), then the adapter
loads with peft on the base model, changes its logits, and the server registers and serves it by name."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import torch
from safetensors.torch import load_file

from tests.conftest import SMOL, start_server
from training.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"


def test_tiny_config_end_to_end(smol_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    argv = ["--config", str(CONFIG), "--output_dir", str(tmp_path / "adapters"), "--run_dir", str(tmp_path / "run")]
    assert main([*argv, "--no-progress"]) == 0
    print(f"tiny training run: {time.monotonic() - started:.0f} s")

    out = tmp_path / "adapters" / "tiny-smollm2"
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "manifest.json"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["name"] == "smollm2-135m-instruct"
    assert manifest["base_model"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert manifest["config"]["selection"]["k"] == 2 and manifest["created"]
    (iteration,) = manifest["iterations"]
    assert iteration["selected"] > 0 and iteration["refine"]["direct"] == iteration["selected"]
    assert iteration["train"]["steps"] >= 1 and iteration["heldout"]["n"] == 4
    assert manifest["baseline"]["n"] == 4
    weights = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())

    # Resuming a finished run redoes nothing (no record sampled, no weights trained again) and publishes the same
    # adapter; the progress plot and the state file are rewritten, which is fine.
    work = [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".jsonl", ".safetensors")]
    run_files = {p: p.stat().st_mtime_ns for p in work}
    published = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--no-progress"]) == 0
    assert any(p.suffix == ".safetensors" for p in work) and any(p.suffix == ".jsonl" for p in work)
    assert {p: p.stat().st_mtime_ns for p in run_files} == run_files
    republished = {p.name: p.read_bytes() for p in out.iterdir()}
    assert republished.keys() == published.keys()
    assert all(republished[name] == published[name] for name in published if name != "manifest.json")

    def manifest_but_time(raw: bytes) -> dict:
        return {k: v for k, v in json.loads(raw).items() if k != "created"}

    assert manifest_but_time(republished["manifest.json"]) == manifest_but_time(published["manifest.json"])

    _adapter_changes_logits(smol_dir, out)
    _server_serves_adapter(tmp_path / "adapters", tmp_path / "logs")


def _adapter_changes_logits(base_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = tokenizer("What is the weather in Paris?", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        tuned = PeftModel.from_pretrained(model, str(adapter_dir))
        adapted = tuned(ids).logits
    assert (adapted - base).abs().max() > 1e-3


def _server_serves_adapter(adapters_dir: Path, log_dir: Path) -> None:
    """As the README says: `toolace-r serve --adapters-dir` registers the published adapter under its name."""
    log_dir.mkdir()
    with contextmanager(start_server)(SMOL, log_dir, "--adapters-dir", str(adapters_dir)) as server:
        client = openai.OpenAI(base_url=server.v1, api_key=server.api_key)
        assert "tiny-smollm2" in {m.id for m in client.models.list()}
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        reply = client.chat.completions.create(model="tiny-smollm2", messages=messages, max_tokens=8)  # type: ignore[arg-type]
        assert reply.model == "tiny-smollm2" and reply.usage and reply.usage.completion_tokens > 0
