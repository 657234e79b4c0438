"""SFT cost with and without `sft.share_prefixes`: forward and backward over the same samples' examples, as separate
rows and packed one row per sample (the prompt once), alternating ABBA, on the trainer's own model and loss.

    .venv/bin/python tests/bench/bench_sft_packing.py \
        --examples runs/qwen2.5-coder-0.5b-toolace-r-native-2b/iter_2/examples.jsonl --samples 8

Prints, per side, tokens run through the model, seconds, and label tokens per second (what training is for); the ratio
of the two sides' seconds is the speed-up on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from server import model_store
from training.config import SFTConfig
from training.refine_data import Example
from training.sft import Encoded, _encode, _lora_model, collate, completion_loss_sum


def _pass(model: Any, rows: list[Encoded]) -> float:
    """One forward and backward per row (micro batch 1, as the Qwen config trains); seconds taken."""
    started = time.perf_counter()
    for row in rows:
        loss = completion_loss_sum(model, collate([row], 0), row.completion_length + 1)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, required=True, help="an iteration's examples.jsonl")
    parser.add_argument("--samples", type=int, default=8, help="samples (with all their examples) to run")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-seq-len", type=int, default=1280)
    args = parser.parse_args()

    examples = [Example.from_json(json.loads(line)) for line in args.examples.open()]
    chosen: list[str] = []
    for e in examples:  # the first samples that have refine examples beside their direct one
        sid = e.id.split("#")[0]
        if "#" in e.id and sid not in chosen:
            chosen.append(sid)
    picked = [e for e in examples if e.id.split("#")[0] in chosen[: args.samples]]
    base = model_store.resolve(args.model)
    separate, _ = _encode(base, picked, args.max_seq_len, share_prefixes=False)
    packed, _ = _encode(base, picked, args.max_seq_len, share_prefixes=True)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the Qwen configs'
    model = _lora_model(base, SFTConfig(target_modules=modules), None, None)
    model.train()
    sides = {"separate": separate, "packed": packed}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    _pass(model, packed[:1])  # warm-up
    for name in ("separate", "packed", "packed", "separate"):  # ABBA
        seconds[name].append(_pass(model, sides[name]))
    labels = sum(r.completion_length for r in separate)
    report = {
        "examples": len(picked),
        "samples": len(packed),
        "label_tokens": labels,
        "threads": torch.get_num_threads(),
    }
    for name, rows in sides.items():
        mean = sum(seconds[name]) / len(seconds[name])
        report[name] = {
            "rows": len(rows),
            "tokens": sum(len(r.input_ids) for r in rows),
            "seconds": [round(s, 1) for s in seconds[name]],
            "label_tokens_per_s": round(labels / mean, 2),
        }
    report["speedup"] = round(sum(seconds["separate"]) / sum(seconds["packed"]), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
