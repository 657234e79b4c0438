"""`toolace-r eval`: BFCL through the chat-completions API of any OpenAI-compatible server.

Registered through the `toolace_r.commands` entry-point group; also runs as `python -m training.evaluation.cli eval`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server.refine import DEFAULT_MAX_ITERATIONS, RefineMode
from training.evaluation import bfcl, multi_turn
from training.evaluation.runner import CATEGORIES, MODES, EvalConfig


def _csv(choices: Sequence[str]):
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in items if v not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {value!r})")
        return items

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a server on BFCL through /v1/chat/completions",
        description="Send BFCL questions with their functions as `tools` to an OpenAI-compatible server, score the "
        "answers with BFCL's AST checker (multi_turn_base: play each conversation as an agent, executing the calls "
        "against BFCL's backends, and score it with BFCL's multi-turn checker), and write results.jsonl, summary.md "
        "and plots under --out. Reruns skip answered questions.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("TOOLACE_R_API_KEY") or "EMPTY"
    )
    p.add_argument("--model", help="the `model` sent in each request (a base model or an adapter name)")
    p.add_argument(
        "--label",
        default=None,
        help="the run's name in the summary table and in --out (default: --model); two labels keep two runs "
        "of one model apart, e.g. on two engines",
    )
    p.add_argument(
        "--categories",
        type=_csv(CATEGORIES),
        default=bfcl.NON_LIVE,
        help=f"comma-separated (default: the non-live ones; also {', '.join(bfcl.LIVE + multi_turn.CATEGORIES)})",
    )
    p.add_argument("--refine", type=_csv(MODES), default=(RefineMode.NONE.value,), help="comma-separated refine modes")
    p.add_argument("--max-refine-iterations", type=int, default=DEFAULT_MAX_ITERATIONS)
    p.add_argument("--limit", type=int, default=None, help="the same N questions per category every time (fixed seed)")
    p.add_argument("--seed", type=int, default=bfcl.DEFAULT_SEED, help="the subset seed for --limit")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=None, help="per round (default: the server's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument(
        "--underscore-names",
        action="store_true",
        help="send math.factorial as math_factorial (servers that reject dots in tool names)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=multi_turn.MAX_STEPS,
        help="multi-turn: BFCL's step cap; a turn still calling tools after N+1 answers ends the question "
        "(force-terminated, invalid)",
    )
    p.add_argument(
        "--max-turns",
        type=int,
        default=None,
        help="multi-turn: play and score only the first N user turns (smoke tests; rows are not comparable)",
    )
    p.add_argument(
        "--tool-grammar",
        choices=("on", "off"),
        default=None,
        help="ask for the server's lazy tool-call grammar under tool_choice auto (the `tool_grammar` extension) or "
        "for free decoding; default: whatever the server does",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for results.jsonl, summary.md and plots")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary.md and plots from results.jsonl")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from training.evaluation import report

    if not args.report_only:
        if not args.model:
            print("toolace-r eval: --model is required (or --report-only)", file=sys.stderr)
            return 2
        from training.evaluation.runner import Evaluator

        config = EvalConfig(
            base_url=args.base_url,
            api_key=args.api_key,
            model=args.model,
            label=args.label,
            out=args.out,
            categories=tuple(args.categories),
            modes=tuple(args.refine),
            max_refine_iterations=args.max_refine_iterations,
            limit=args.limit,
            seed=args.seed,
            concurrency=args.concurrency,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            underscore_names=args.underscore_names,
            progress=args.progress,
            max_steps=args.max_steps,
            max_turns=args.max_turns,
            tool_grammar=None if args.tool_grammar is None else args.tool_grammar == "on",
        )
        stats = Evaluator(config).run()
        print(
            f"answered {stats.sent} ({stats.valid} valid), skipped {stats.skipped} already answered, "
            f"failed {stats.failed}",
            file=sys.stderr,
        )
        for failure in stats.failures[:10]:
            print(f"  failed: {failure}", file=sys.stderr)
    written = report.write_report(args.out)
    for path in written:
        print(path)
    if not args.report_only and stats.failed:
        print(f"{stats.failed} requests failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluation.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
