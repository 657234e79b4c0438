"""The eval runner: rows from OpenAI responses, resume, failures; and end to end against the real server (SmolLM2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import openai  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

from training.evaluation import cli  # noqa: E402
from training.evaluation.runner import RESULTS_FILE, EvalConfig, Evaluator  # noqa: E402
from training.resumable import read_jsonl  # noqa: E402


class StubClient:
    """Answers like our server: math.factorial(number=5) for every question, with a refinement history."""

    def __init__(self, fail_ids: set[str] = frozenset(), reject: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_ids = fail_ids
        self.reject = reject
        self.chat = self
        self.completions = self

    def create(self, **kwargs: Any) -> ChatCompletion:
        self.requests.append(kwargs)
        question = kwargs["messages"][0]["content"]
        request = httpx.Request("POST", "http://stub/v1/chat/completions")
        if any(i in question for i in self.fail_ids):
            raise openai.APIConnectionError(request=request)
        if self.reject:
            body = {"error": {"message": "too long", "code": "context_length_exceeded"}}
            raise openai.BadRequestError("too long", response=httpx.Response(400, request=request), body=body)
        name = kwargs["tools"][0]["function"]["name"]
        extra = kwargs.get("extra_body") or {}
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": kwargs["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": name, "arguments": '{"number": 5}'}}
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        if extra.get("refine"):
            n = extra["max_refine_iterations"]
            body["refinement"] = {
                "mode": extra["refine"],
                "iterations": n,
                "stop_reason": "max_iterations",
                "answers": [f"[{name}(number=5)]"] * (n + 1),
            }
        else:
            body["refinement"] = {"mode": "none", "iterations": 0, "stop_reason": "none"}
        return ChatCompletion.model_validate(body)


def _config(tmp_path: Path, **kw: Any) -> EvalConfig:
    base = {"base_url": "http://stub/v1", "model": "m", "out": tmp_path, "categories": ("simple_python",), "limit": 3}
    return EvalConfig(**(base | {"progress": False} | kw))


def test_rows_resume_and_failures(tmp_path: Path) -> None:
    config = _config(tmp_path, modes=("none", "vanilla"), max_refine_iterations=2, categories=("simple_python",))
    client = StubClient()
    evaluator = Evaluator(config, client)
    failing = evaluator.work()[0][1].messages[0]["content"]  # one of the questions the subset holds
    client.fail_ids = {failing}
    stats = evaluator.run()
    rows = list(read_jsonl(tmp_path / RESULTS_FILE))
    assert stats.failed == 2 and stats.sent == len(rows) == 6 - stats.failed  # that question, in both modes
    for row in rows:
        assert {
            "id",
            "category",
            "mode",
            "request_id",
            "raw",
            "calls",
            "valid",
            "error_type",
            "rounds",
            "latency_s",
        } <= set(row)
        assert row["usage"]["total_tokens"] == 15
        assert row["rounds"] == (0 if row["mode"] == "none" else 2)
        if row["mode"] == "vanilla":
            assert len(row["history_valid"]) == 3 and row["history_valid"][-1] == row["valid"]
    sent = [r for r in client.requests if r.get("extra_body")]
    assert all(r["extra_body"]["return_refinement_history"] for r in sent)
    assert all("extra_body" not in r for r in client.requests if r not in sent)  # `none`: a plain request
    # A rerun sends only what is missing.
    again = StubClient()
    stats2 = Evaluator(config, again).run()
    assert stats2.skipped == len(rows) and stats2.sent == stats.failed == len(again.requests)


def test_factorial_answer_scores_valid_and_400_is_an_invalid_row(tmp_path: Path) -> None:
    config = _config(tmp_path, limit=None)
    evaluator = Evaluator(config, StubClient())
    (question,) = [q for m, q in evaluator.work() if q.id == "simple_python_1"]
    row = evaluator.ask("none", question)
    assert row["valid"] and row["calls"] == [{"math.factorial": {"number": 5}}]
    rejected = Evaluator(config, StubClient(reject=True)).ask("adaptive", question)
    assert not rejected["valid"] and rejected["error_type"] == "http_400:context_length_exceeded"


def test_eval_end_to_end_against_the_real_server(smol_server, tmp_path: Path) -> None:
    argv = [
        "eval",
        "--base-url", smol_server.v1,
        "--api-key", smol_server.api_key,
        "--model", smol_server.model,
        "--categories", "simple_python,irrelevance",
        "--refine", "none,vanilla",
        "--max-refine-iterations", "1",
        "--limit", "2",
        "--max-tokens", "16",
        "--concurrency", "4",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    rows = list(read_jsonl(tmp_path / RESULTS_FILE))
    assert len(rows) == 8
    assert {(r["mode"], r["category"]) for r in rows} == {
        (m, c) for m in ("none", "vanilla") for c in ("simple_python", "irrelevance")
    }
    for row in rows:
        assert row["request_id"].startswith("chatcmpl-")
        assert row["rounds"] == (0 if row["mode"] == "none" else 1)
        assert row["usage"]["completion_tokens"] > 0
        if row["mode"] == "vanilla":
            assert len(row["history"]) == 2 and len(row["history_valid"]) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "| Model | Refine | Simple | Irrelevance | Overall | Avg rounds |" in summary
    assert (tmp_path / "accuracy_vs_rounds.png").stat().st_size > 0
    # Resumable: the same command sends nothing.
    assert cli.main(argv) == 0
    assert len(list(read_jsonl(tmp_path / RESULTS_FILE))) == 8
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["pending"] for r in runs] == [8, 0]


def test_tool_grammar_is_asked_for_in_every_mode(tmp_path: Path) -> None:
    for switch in (True, False):
        client = StubClient()
        Evaluator(_config(tmp_path / str(switch), modes=("none", "adaptive"), tool_grammar=switch), client).run()
        assert client.requests and all(r["extra_body"]["tool_grammar"] is switch for r in client.requests)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "m", "--out", str(tmp_path), "--tool-grammar", "off"])
    assert args.tool_grammar == "off"
