"""multi_turn_base through the chat API: the agent loop against a scripted client, BFCL's checker, the call strings,
the runner and report hooks; and end to end against the real server (SmolLM2)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai  # noqa: E402
import pytest
from openai.types.chat import ChatCompletion  # noqa: E402

from training.evaluation import bfcl, cli, multi_turn, report  # noqa: E402
from training.evaluation.runner import RESULTS_FILE, EvalConfig, Evaluator  # noqa: E402
from training.resumable import read_jsonl  # noqa: E402

CATEGORY = "multi_turn_base"


def _question(question_id: str) -> multi_turn.Question:
    (question,) = [q for q in multi_turn.load_category(CATEGORY) if q.id == question_id]
    return question


def _arguments(call: str, classes: list[str]) -> tuple[str, dict[str, Any]]:
    """A ground-truth call string (keywords or positional) -> (name, keyword arguments), as a model would send it."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    node = ast.parse(call, mode="eval").body
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    name = node.func.id
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    for class_name in classes:
        backend = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
        if hasattr(backend, name):
            bound = inspect.signature(getattr(backend, name)).bind(None, *args, **kwargs)
            return name, {k: v for k, v in bound.arguments.items() if k != "self"}
    raise AssertionError(f"{name} is in none of {classes}")


def _completion(tool_calls: list[tuple[str, dict[str, Any] | str]] | None = None, text: str | None = None) -> dict:
    """A chat completion: tool calls (arguments as a dict, or raw text) or a text answer."""
    calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)},
        }
        for i, (n, a) in enumerate(tool_calls or [])
    ]
    message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls" if calls else "stop", "message": message}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class ScriptedClient:
    """Stands in for `openai.OpenAI`: `chat.completions.create` answers from `script(request) -> completion dict`."""

    def __init__(self, script: Callable[[dict[str, Any]], dict]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.chat = self
        self.completions = self

    def create(self, **kwargs: Any) -> ChatCompletion:
        self.requests.append(json.loads(json.dumps(kwargs)))  # a snapshot: the loop keeps appending to messages
        return ChatCompletion.model_validate(self.script(kwargs))


def ground_truth_script(question: multi_turn.Question) -> Iterator[dict]:
    """The ground truth, one call per step, and a text answer to end each turn."""
    for turn in question.ground_truth:
        for call in turn:
            yield _completion([_arguments(call, question.involved_classes)])
        yield _completion(text="Done.")


def _config(tmp_path: Path, **kw: Any) -> EvalConfig:
    base = {"base_url": "http://stub/v1", "model": "m", "out": tmp_path, "categories": (CATEGORY,), "progress": False}
    return EvalConfig(**(base | kw))


def _backends() -> list[str]:
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    return [n for n in vars(multi_turn_utils) if n.startswith("toolace_r_")]


@pytest.mark.parametrize("question_id", ["multi_turn_base_0", "multi_turn_base_84", "multi_turn_base_116"])
def test_the_ground_truth_played_step_by_step_scores_valid(question_id: str, tmp_path: Path) -> None:
    question = _question(question_id)
    answers = ground_truth_script(question)
    client = ScriptedClient(lambda request: next(answers))
    row = Evaluator(_config(tmp_path), client).ask("none", question)
    assert row["valid"], row["error"]
    assert row["error_type"] is None and row["category"] == CATEGORY and row["id"] == question_id
    assert row["turns_right"] == len(question.turns)
    calls = sum(len(turn) for turn in question.ground_truth)
    assert row["requests"] == len(client.requests) == calls + len(question.turns)
    assert row["usage"]["total_tokens"] == 15 * row["requests"]
    # What the checker replayed: one step per call, each turn's calls in order (keywords, as BFCL's decoder writes).
    assert [len(turn) for turn in row["calls"]] == [len(turn) for turn in question.ground_truth]
    assert [step["content"] for turn in row["turns"] for step in turn if not step["calls"]] == ["Done."] * len(
        question.turns
    )
    # The conversation an agent framework sends: the user's turns, each assistant answer with its tool_calls, and one
    # tool message per call answering its id with the execution result.
    last = client.requests[-1]
    assert last["tools"] == question.tools() and last["temperature"] == 0.0 and "extra_body" not in last
    messages = last["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [t[0]["content"] for t in question.turns]
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            (tool_call,) = m["tool_calls"]
            reply = messages[i + 1]
            assert reply["role"] == "tool" and reply["tool_call_id"] == tool_call["id"]
            assert not reply["content"].startswith("Error during execution"), reply["content"]
    assert not _backends()  # the question's backend instances are released


def test_a_model_that_never_stops_calling_is_force_terminated(tmp_path: Path) -> None:
    from bfcl_eval.constants.default_prompts import MAXIMUM_STEP_LIMIT

    assert multi_turn.MAX_STEPS == MAXIMUM_STEP_LIMIT == EvalConfig("u", "m", tmp_path).max_steps
    question = _question("multi_turn_base_0")
    client = ScriptedClient(lambda request: _completion([("ls", {"a": True})]))
    row = Evaluator(_config(tmp_path, max_steps=3), client).ask("adaptive", question)
    assert not row["valid"] and row["error_type"] == "multi_turn:force_terminated"
    assert row["requests"] == 4  # BFCL's rule: after max_steps + 1 answers that still call tools
    assert len(row["turns"]) == 1 and all(step["calls"] == ["ls(a=True)"] for step in row["turns"][0])
    assert client.requests[0]["extra_body"] == {"refine": "adaptive", "max_refine_iterations": 5}
    assert not _backends()


def test_answers_without_calls_score_as_empty_turns(tmp_path: Path) -> None:
    client = ScriptedClient(lambda request: _completion(text="I would rather not."))
    question = _question("multi_turn_base_0")
    row = Evaluator(_config(tmp_path), client).ask("none", question)
    assert not row["valid"] and row["error_type"] == "multi_turn:empty_turn_model_response"
    assert row["requests"] == len(row["turns"]) == 1 < len(question.turns)  # the first turn fails: nothing more played
    assert row["turns_right"] == 0
    assert not _backends()


def test_a_question_stops_at_its_first_failing_turn_with_the_whole_conversations_verdict(tmp_path: Path) -> None:
    question = _question("multi_turn_base_0")
    assert len(question.turns) >= 3
    right = iter(
        [_completion([_arguments(c, question.involved_classes)]) for c in question.ground_truth[0]]
        + [_completion(text="Done.")]
    )
    client = ScriptedClient(lambda request: next(right, None) or _completion(text="I would rather not."))
    row = Evaluator(_config(tmp_path), client).ask("none", question)
    assert not row["valid"] and len(row["turns"]) == 2  # turn 0 right, turn 1 a text answer where calls were due
    assert row["turns_right"] == 1
    # The verdict of the whole conversation (every later turn answered in words as well) is the same.
    rest = [[] for _ in question.turns[2:]]
    whole = multi_turn.score(question, row["calls"] + rest, "toolace_r_whole")
    multi_turn._release("toolace_r_whole")
    assert (whole.valid, whole.error_type) == (False, row["error_type"])
    assert not _backends()


def test_calls_to_functions_not_offered_are_not_executed(tmp_path: Path) -> None:
    target = tmp_path / "must-not-exist.txt"
    script = iter(
        [
            _completion([("open", {"file": str(target), "mode": "w"}), ("cd", {"folder": "document"})]),
            _completion([("mkdir", {"dir name": "x"})]),
            _completion([("cd", '{"folder": ')]),  # arguments that are not JSON: the turn ends, as in BFCL
        ]
    )
    raw = ScriptedClient(lambda request: next(script))
    question = _question("multi_turn_base_0")
    row = Evaluator(_config(tmp_path, max_turns=1), raw).ask("none", question)
    assert not target.exists()
    first, second, third = row["turns"][0]
    assert "not one of the offered functions" in first["results"][0]
    assert json.loads(first["results"][1]) == {"current_working_directory": "document"}
    assert "not a valid argument name" in second["results"][0]
    assert "not JSON" in third["error"] and row["requests"] == 3
    assert row["calls"] == [[["cd(folder='document')"]]]  # only the executed calls are replayed by the checker
    tool_messages = [m for m in raw.requests[-1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_0", "call_1", "call_0"]


def _status_error(status: int) -> Exception:
    request = httpx.Request("POST", "http://stub/v1/chat/completions")
    body = {"error": {"message": "too long", "code": "context_length_exceeded" if status == 400 else None}}
    return openai.APIStatusError("refused", response=httpx.Response(status, request=request), body=body)


@pytest.mark.parametrize("status", [400, 503])
def test_a_refused_request_ends_the_question_or_is_retried(status: int, tmp_path: Path) -> None:
    answers = iter([_completion([("ls", {})])])

    def script(request: dict[str, Any]) -> dict:
        answer = next(answers, None)
        if answer is None:
            raise _status_error(status)
        return answer

    evaluator = Evaluator(_config(tmp_path), ScriptedClient(script))
    question = _question("multi_turn_base_0")
    if status >= 500:  # the server's fault: no row, the runner retries the question next run
        with pytest.raises(openai.APIStatusError):
            evaluator.ask("none", question)
    else:  # the question's: an invalid row, with what was played
        row = evaluator.ask("none", question)
        assert not row["valid"] and row["error_type"] == "http_400:context_length_exceeded"
        assert row["requests"] == 1 and row["turns"][0][0]["calls"] == ["ls()"]
    assert not _backends()


VALUES = [
    {"folder": "document"},
    {"content": 'It\'s a "quoted"\nline\twith ünïcode ✓ and a backslash \\'},
    {"a": True, "b": None, "n": -3, "x": 2.5, "big": 10**20},
    {"items": [1, "two", [3.0, {"k": [False]}]], "mapping": {"nested": {"deep": ["x", None]}}},
    {},
]


@pytest.mark.parametrize("arguments", VALUES)
def test_call_strings_round_trip_through_bfcl_decoder(arguments: dict[str, Any]) -> None:
    from bfcl_eval.model_handler.utils import default_decode_ast_prompting

    text = multi_turn.call_string("post_tweet", arguments)
    assert default_decode_ast_prompting(f"[{text}]") == [{"post_tweet": arguments}]
    # and the loop sends the same string for the same tool call with JSON arguments (the server's wire format)
    tool_call = {"function": {"name": "post_tweet", "arguments": json.dumps(arguments)}}
    ((name, parsed),) = bfcl.calls_from_tool_calls([tool_call])[0][0].items()
    assert multi_turn.call_string(name, parsed) == text


def test_subsets_are_fixed_and_nested_and_the_runner_resumes(tmp_path: Path) -> None:
    first = [q.id for q in multi_turn.subset(CATEGORY, 5)]
    assert first == [q.id for q in multi_turn.subset(CATEGORY, 5)] and len(set(first)) == 5
    assert set(first) <= {q.id for q in multi_turn.subset(CATEGORY, 20)}
    assert first != [f"{CATEGORY}_{i}" for i in range(5)]
    assert len(multi_turn.subset(CATEGORY)) == 200
    text = ScriptedClient(lambda request: _completion(text="No."))
    config = _config(tmp_path, limit=2, modes=("none", "vanilla"), categories=("simple_python", CATEGORY))
    stats = Evaluator(config, text).run()
    rows = list(read_jsonl(tmp_path / RESULTS_FILE))
    assert stats.sent == len(rows) == 8 and stats.failed == 0
    assert {(r["mode"], r["category"]) for r in rows if r["category"] == CATEGORY} == {
        ("none", CATEGORY),
        ("vanilla", CATEGORY),
    }
    again = ScriptedClient(lambda request: pytest.fail("a rerun sends nothing"))
    assert Evaluator(config, again).run().skipped == 8


def _row(mode: str, category: str, i: int, valid: bool) -> dict[str, Any]:
    row = {"model": "m", "label": "M", "mode": mode, "category": category, "id": f"{category}_{i}", "valid": valid}
    return row | {"max_refine_iterations": None, "rounds": 0, "latency_s": 1.0}


def test_the_summary_shows_multi_turn_apart_from_overall(tmp_path: Path) -> None:
    rows = [_row("none", "simple_python", i, i < 3) for i in range(4)]  # 75%
    rows += [_row("none", "irrelevance", i, True) for i in range(4)]  # 100%
    rows += [_row("none", CATEGORY, i, i < 1) | {"turns_right": [3, 0, 1, 1][i]} for i in range(4)]  # 25%
    (tmp_path / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    head = "| Model | Refine | Simple | Irrelevance | Overall | Multi Turn Base | Turns right | Avg rounds |"
    assert head in summary
    assert "| M | none | 75.00 | 100.00 | 87.50 | 25.00 | 1.25 | 0.00 |" in summary
    assert "| M | none | 4/400 | 4/240 | 4/200 | 1.0 | 0 |" in summary


def test_the_report_counts_a_multi_turn_questions_refine_rounds_per_request(tmp_path: Path) -> None:
    """A multi-turn row's `rounds` is the mean over its requests (1.333 here); the rounds plot counts the requests."""
    steps = [[{"content": None, "rounds": 1}, {"content": "Done.", "rounds": 2}], [{"content": "Ok.", "rounds": 1}]]
    multi = _row("adaptive", CATEGORY, 0, False) | {"rounds": 1.333, "turns": steps, "turns_right": 0}
    single = _row("adaptive", "simple_python", 0, True) | {"rounds": 3}
    (tmp_path / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in (multi, single)))
    assert report._request_rounds(multi) == [1, 2, 1] and report._request_rounds(single) == [3]
    written = report.write_report(tmp_path)  # raised TypeError on the float before
    assert tmp_path / report.DISTRIBUTION_PLOT in written


def test_multi_turn_end_to_end_against_the_real_server(smol_server, tmp_path: Path) -> None:
    argv = [
        "eval",
        "--base-url", smol_server.v1,
        "--api-key", smol_server.api_key,
        "--model", smol_server.model,
        "--categories", CATEGORY,
        "--refine", "none",
        "--limit", "1",
        "--max-turns", "1",
        "--max-steps", "1",
        "--max-tokens", "16",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (row,) = read_jsonl(tmp_path / RESULTS_FILE)
    assert row["category"] == CATEGORY and row["id"] == multi_turn.subset(CATEGORY, 1)[0].id
    assert row["requests"] >= 1 == len(row["turns"]) and row["request_id"].startswith("chatcmpl-")
    assert isinstance(row["valid"], bool) and (row["valid"] or row["error_type"])
    assert row["usage"]["completion_tokens"] > 0
    assert row["turns_right"] == (1 if row["valid"] else 0)
    assert "| Multi Turn Base | Turns right | Avg rounds |" in (tmp_path / "summary.md").read_text()
    assert not _backends()
