"""`toolace-r train --config training/configs/<name>.yaml [--selection.k 4 ...]`: a base model and tool-calling
data in, a LoRA adapter in `adapters/<name>/` out. Every config field is also a flag (dotted path), which wins over
the file. Running the same command again resumes an interrupted run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from training.config import TrainConfig, leaf_fields


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the `toolace_r.commands` group: adds `train` to the `toolace-r` command."""
    p = subparsers.add_parser("train", help="train a ToolACE-R LoRA adapter (select, refine data, SFT, iterate)")
    add_arguments(p)
    p.set_defaults(func=run_command)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (training/configs/*.yaml); flags override its fields")
    p.add_argument("--fresh", action="store_true", help="discard the run directory's earlier progress")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log-level", default="info")
    overrides = p.add_argument_group("config fields (YAML values: 4, 1e-4, true, [a, b], null)")
    for dotted in leaf_fields():
        overrides.add_argument(f"--{dotted}", dest=f"set:{dotted}", metavar="VALUE", default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    for key, value in vars(args).items():
        if key.startswith("set:") and value is not None:
            config.override(key[4:], _parse_value(value))
    return config


def _parse_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)  # YAML 1.1 reads "3e-4" as a string
    except ValueError:
        pass
    value = yaml.safe_load(text)
    return text if value is None and text.strip() not in ("null", "~", "") else value


def run_command(args: argparse.Namespace) -> int:
    from training.loop import ConfigMismatch, train

    config = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(args.log_level.upper())
    try:
        manifest = train(config, progress=args.progress, fresh=args.fresh)
    except (ConfigMismatch, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "adapter": str(config.adapter_dir()),
        "baseline": manifest["baseline"],
        "iterations": [{k: it[k] for k in ("iteration", "selected", "heldout")} for it in manifest["iterations"]],
        "stop_reason": manifest["stop_reason"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="toolace-r train", description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
