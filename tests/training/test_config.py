"""Config from YAML, flags override, unknown fields refused; the CLI's `train` parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from training.cli import config_from_args, register
from training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    config = TrainConfig.from_yaml(CONFIGS / name)
    config.validate()
    assert config.data.sources


def test_flags_override_the_file() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--selection.k",
            "5",
            "--sft.learning_rate",
            "3e-4",
            "--name",
            "x",
            "--data.max_train_samples",
            "null",
        ]
    )
    config = config_from_args(args)
    assert config.selection.k == 5 and config.sft.learning_rate == 3e-4 and config.name == "x"
    assert config.data.max_train_samples is None
    assert config.model.base == "smollm2-135m-instruct"  # from the file
    assert args.func.__name__ == "run_command"


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(KeyError, match="selection.kk"):
        TrainConfig.from_dict({"selection": {"kk": 3}})
    with pytest.raises(KeyError):
        TrainConfig().override("sft.nope", 1)


CHOICES = [("refine.first_answer", "greediest"), ("model.generate_engine", "vllm"), ("prompt_format", "xml")]


@pytest.mark.parametrize(("field", "value"), CHOICES)
def test_a_choice_outside_its_options_is_refused(field: str, value: str) -> None:
    config = TrainConfig.from_yaml(CONFIGS / "tiny.yaml")
    config.override(field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()


def test_defaults_follow_the_issue() -> None:
    sft = TrainConfig().sft
    assert (sft.lora_r, sft.lora_alpha, sft.learning_rate, sft.lr_scheduler, sft.warmup_ratio) == (
        16,
        32,
        1e-4,
        "cosine",
        0.1,
    )
    assert sft.global_batch_size == 64 and sft.target_modules == "all-linear"
    assert TrainConfig().selection.k == 8 and TrainConfig().selection.temperature == 1.0
