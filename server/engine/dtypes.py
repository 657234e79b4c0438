"""Which floating-point type to run a model in on this machine (`auto`).

bfloat16 halves memory traffic, but only CPUs with native bfloat16 arithmetic (x86 AVX-512 BF16 or AMX, ARM BF16)
compute in it fast; elsewhere torch emulates it. Measured on an AVX2-only AMD EPYC (2 cores): Qwen2.5-Coder-0.5B's
200-token prefill ran at 11 tok/s in bfloat16 and 51 tok/s in float32, but SmolLM2-135M answered a short prompt with
40 tokens in 2.8 s in bfloat16 and 5.7 s in float32 (decoding one row reads memory more than it computes). So `auto`
suits prompt-heavy work (training's sampling and SFT: their defaults); the server keeps bfloat16 unless asked.
GPUs take bfloat16.
"""

from __future__ import annotations

import functools
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float32")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    lines = (line for line in text.splitlines() if line.startswith(("flags", "Features")))
    return frozenset(word for line in lines for word in line.split())


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(dtype: str) -> str:
    """`auto` -> `bfloat16` on a GPU or a CPU with native bfloat16, else `float32`; other names unchanged."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"
