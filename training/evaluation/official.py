"""`toolace-r bfcl`: BFCL's own runner, unmodified, scores a server as it would score OpenAI.

`bfcl generate --model gpt-4o-2024-11-20-FC` sends each question through the OpenAI SDK's `responses.create` to
`OPENAI_BASE_URL`; `bfcl evaluate` scores the answers. This command only points the runner at the server, hands it
the same fixed subsets `toolace-r eval --limit N` uses (BFCL's `test_case_ids_to_generate.json`) and gathers the
scores, so the two harnesses can be compared question for question.

The runner lives in its own environment (`make install-bfcl-runner`: its dependencies pin numpy 1.26 and pull every
provider's SDK, which the project's environment should not carry). The server must answer to the runner's model
name: start it with `--served-model-name <name> gpt-4o-2024-11-20`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from training.evaluation import bfcl

HANDLER = "gpt-4o-2024-11-20-FC"  # BFCL's OpenAI Responses API handler for function calling
RUNNER = Path(".venv-bfcl/bin/bfcl")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bfcl",
        help="score a server with BFCL's own runner (through the Responses API)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("TOOLACE_R_API_KEY") or "EMPTY"
    )
    p.add_argument("--categories", default=",".join(bfcl.NON_LIVE), help="comma-separated BFCL categories")
    p.add_argument("--limit", type=int, default=None, help="the same N questions per category as `toolace-r eval`")
    p.add_argument("--seed", type=int, default=bfcl.DEFAULT_SEED)
    p.add_argument("--threads", type=int, default=4, help="the runner's --num-threads (requests in flight)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="the runner's --temperature (its own default, 0.001, samples: near-ties break at random; 0 is greedy, "
        "as `toolace-r eval`)",
    )
    p.add_argument("--runner", type=Path, default=RUNNER, help="the `bfcl` executable (make install-bfcl-runner)")
    p.add_argument("--out", type=Path, required=True, help="the runner's project root: results, scores, the id file")
    p.set_defaults(func=run)


def write_ids(out: Path, categories: list[str], limit: int | None, seed: int) -> dict[str, list[str]]:
    ids = {category: [q.id for q in bfcl.subset(category, limit, seed)] for category in categories}
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_case_ids_to_generate.json").write_text(json.dumps(ids, indent=1) + "\n")
    return ids


def read_scores(out: Path) -> dict[str, dict[str, float]]:
    """Category -> the runner's accuracy and counts (the first line of each of its score files)."""
    scores = {}
    for path in sorted((out / "score").rglob("*_score.json")):
        with path.open() as lines:
            head = json.loads(lines.readline())
        category = path.name.removesuffix("_score.json").split("_", 2)[-1]  # BFCL_v4_<category>_score.json
        scores[category] = {k: head[k] for k in ("accuracy", "correct_count", "total_count") if k in head}
    return scores


def run(args: argparse.Namespace) -> int:
    if not args.runner.exists():
        print(f"toolace-r bfcl: no runner at {args.runner}; run `make install-bfcl-runner`", file=sys.stderr)
        return 2
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    write_ids(args.out, categories, args.limit, args.seed)
    env = {
        **os.environ,
        "BFCL_PROJECT_ROOT": str(args.out.resolve()),
        "OPENAI_BASE_URL": args.base_url,
        "OPENAI_API_KEY": args.api_key,
    }
    runner = str(args.runner)
    generate = [runner, "generate", "--model", HANDLER, "--run-ids", "--num-threads", str(args.threads)]
    generate += ["--temperature", str(args.temperature)]
    subprocess.run(generate, env=env, check=True)
    evaluate = [runner, "evaluate", "--model", HANDLER, "--test-category", ",".join(categories), "--partial-eval"]
    subprocess.run(evaluate, env=env, check=True)
    scores = read_scores(args.out)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    for category in categories:
        score = scores.get(category)
        line = f"{score['accuracy'] * 100:.1f} ({score['correct_count']}/{score['total_count']})" if score else "-"
        print(f"{category:20} {line}")
    return 0
