"""The BFCL scorer agrees with BFCL on its own possible answers; tools, subsets, histories and the report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from training.evaluation import bfcl, report  # noqa: E402
from training.evaluation.runner import _history_scores  # noqa: E402


def _pick(value: Any, doc: dict[str, Any] | None = None) -> Any:
    """A concrete value from BFCL's possible values (nested dicts hold lists of possible values too)."""
    if isinstance(value, dict):
        required = set((doc or {}).get("required", []))
        props = (doc or {}).get("properties")
        out = {}
        for key, options in value.items():
            concrete = [o for o in options if o != ""]
            if props is not None and key not in props:
                continue  # a few answers list a parameter the doc does not have: leaving it out is the valid answer
            if "" in options and key not in required or not concrete:
                continue
            out[key] = _pick(concrete[0])
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_pick(v) for v in value]
    return value


def _answer(question: bfcl.Question) -> list[dict[str, Any]]:
    """The first possible answer, as an OpenAI server would return it: JSON arguments in message.tool_calls."""
    docs = {f["name"]: f["parameters"] for f in question.functions}
    tool_calls = []
    for call in question.ground_truth:
        ((name, params),) = call.items()
        arguments = json.dumps(_pick(params, docs[name]))
        tool_calls.append({"id": "x", "type": "function", "function": {"name": name, "arguments": arguments}})
    return tool_calls


def _score(question: bfcl.Question, tool_calls: list[dict[str, Any]]) -> bfcl.Score:
    calls, error = bfcl.calls_from_tool_calls(tool_calls)
    return bfcl.score(question, calls, error)


@pytest.mark.parametrize("category", [c for c in bfcl.NON_LIVE if c != "irrelevance"])
def test_ground_truth_answers_score_valid(category: str) -> None:
    questions = bfcl.load_category(category)
    assert (
        len(questions) == {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200}[category]
    )
    failures = [(q.id, s) for q in questions if not (s := _score(q, _answer(q))).valid]
    assert not failures, failures[:3]


@pytest.mark.parametrize("category", [c for c in bfcl.NON_LIVE if c != "irrelevance"])
def test_broken_answers_score_invalid(category: str) -> None:
    for question in bfcl.load_category(category)[:60]:
        good = _answer(question)
        assert _score(question, []).error_type == "ast_decoder:no_tool_call"
        renamed = json.loads(json.dumps(good))
        renamed[0]["function"]["name"] += "_v2"
        assert not _score(question, renamed).valid, question.id
        assert not _score(question, good + good[:1]).valid, question.id  # one call too many
        if len(good) > 1:
            assert not _score(question, good[:-1]).valid, question.id  # one call missing
        wrong = json.loads(json.dumps(good))
        args = json.loads(wrong[0]["function"]["arguments"])
        if args:
            key = next(iter(args))
            args[key] = {"not": "the answer"}
            wrong[0]["function"]["arguments"] = json.dumps(args)
            assert not _score(question, wrong).valid, question.id
        unreadable = json.loads(json.dumps(good))
        unreadable[0]["function"]["arguments"] = "{not json"
        assert _score(question, unreadable).error_type == "ast_decoder:decoder_failed"


def test_irrelevance_scores_no_call_as_right() -> None:
    questions = bfcl.load_category("irrelevance")
    assert len(questions) == 240
    for question in questions:
        assert bfcl.score(question, []).valid
        name = question.functions[0]["name"]
        call = [{"function": {"name": name, "arguments": "{}"}}]
        score = _score(question, call)
        assert not score.valid and score.error_type == "irrelevance_error:decoder_success"


def test_an_int_is_accepted_for_a_float_parameter() -> None:
    (question,) = [q for q in bfcl.load_category("parallel_multiple") if q.id == "parallel_multiple_1"]
    calls = [
        {"function": {"name": "area_rectangle.calculate", "arguments": '{"length": 7, "breadth": 3}'}},
        {"function": {"name": "area_circle.calculate", "arguments": '{"radius": 5}'}},
    ]
    assert _score(question, calls).valid
    calls[1]["function"]["arguments"] = '{"radius": "5"}'
    assert _score(question, calls).error_type == "parallel_function_checker_no_order:cannot_find_match"


def _types(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_types(v) for k, v in node.items() if k != "type"))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node)) if node else set()
    return set()


def test_tools_are_json_schema_with_bfcl_names() -> None:
    seen: set[str] = set()
    for category in bfcl.NON_LIVE:
        for question in bfcl.load_category(category):
            tools = question.tools()
            assert [t["function"]["name"] for t in tools] == [f["name"] for f in question.functions]
            for tool in tools:
                assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"
                assert "Python 3 syntax" in tool["function"]["description"]
                seen |= _types(tool["function"]["parameters"])
    assert seen <= {"object", "string", "integer", "number", "boolean", "array"}, seen
    # The original docs are untouched (the checker reads them).
    assert bfcl.load_category("simple_python")[0].functions[0]["parameters"]["type"] == "dict"


def test_underscore_names_map_back_to_bfcl_names() -> None:
    (question,) = [q for q in bfcl.load_category("simple_python") if q.id == "simple_python_1"]
    (tool,) = question.tools(underscore_names=True)
    assert tool["function"]["name"] == "math_factorial"
    calls, error = bfcl.calls_from_tool_calls(
        [{"function": {"name": "math_factorial", "arguments": '{"number": 5}'}}], question.name_map(True)
    )
    assert error is None and calls == [{"math.factorial": {"number": 5}}]
    assert bfcl.score(question, calls).valid


def test_a_call_without_a_name_does_not_decode() -> None:
    for function in ({"arguments": "{}"}, {"name": "", "arguments": "{}"}, {"name": None, "arguments": "{}"}):
        assert bfcl.calls_from_tool_calls([{"function": function}]) == (None, "tool_calls[0] has no function name")


def test_subsets_are_fixed_and_nested() -> None:
    first = [q.id for q in bfcl.subset("parallel", 20)]
    assert first == [q.id for q in bfcl.subset("parallel", 20)]
    assert len(first) == 20 and len(set(first)) == 20
    assert set(first) <= {q.id for q in bfcl.subset("parallel", 50)}
    assert first != [q.id for q in bfcl.subset("parallel", 20, seed=1)]
    assert first != [f"parallel_{i}" for i in range(20)]  # spread over the category, not its head
    assert len(bfcl.subset("parallel", None)) == len(bfcl.subset("parallel", 10_000)) == 200


def test_round_histories_score_each_round_and_the_running_majority() -> None:
    (question,) = [q for q in bfcl.load_category("simple_python") if q.id == "simple_python_1"]
    right, wrong = "[math.factorial(number=5)]", "[math.factorial(number=6)]"
    offered = {"math.factorial"}
    per_round, majority = _history_scores(question, [wrong, right, wrong, right, right], offered, {})
    assert per_round == [False, True, False, True, True]
    # rounds 1..r: {right}, {right, wrong} -> latest (wrong), {r, w, r} -> right, {r, w, r, r} -> right
    assert majority == [False, True, False, True, True]
    per_round, majority = _history_scores(question, [right, "I cannot help.", "[other.tool(x=1)]"], offered, {})
    assert per_round == [True, False, False]


def _row(mode: str, category: str, i: int, valid: bool, **extra: Any) -> dict[str, Any]:
    row = {"model": "m", "label": "M", "mode": mode, "category": category, "id": f"{category}_{i}", "valid": valid}
    row |= {"max_refine_iterations": None if mode == "none" else 3, "rounds": 0, "latency_s": 1.0}
    return row | extra


def test_report_table_curves_and_plots(tmp_path) -> None:
    rows = []
    for i in range(4):
        rows.append(_row("none", "simple_python", i, i < 2))
        rows.append(_row("none", "irrelevance", i, True))
        # adaptive stops at round 1 for even i; for odd i it runs to the cap and the last round is right
        hv = [False, False] if i % 2 == 0 else [False, False, False, True]
        rows.append(_row("adaptive", "simple_python", i, hv[-1], rounds=len(hv) - 1, history_valid=hv))
        # vanilla's last round is always right; the majority of rounds 1..3 only for even i
        hv, mv = ([False, True, True, True],) * 2 if i % 2 == 0 else ([False, False, False, True], [False] * 4)
        rows.append(_row("vanilla", "simple_python", i, True, rounds=3, history_valid=hv, history_majority_valid=mv))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    written = report.write_report(tmp_path)
    names = {p.name for p in written}
    assert {"summary.md", "accuracy_vs_rounds.png", "rounds_distribution.png"} <= names
    summary = (tmp_path / "summary.md").read_text()
    assert "| Model | Refine | Simple | Irrelevance | Overall | Avg rounds |" in summary
    assert "| M | none | 50.00 | 100.00 | 75.00 | 0.00 |" in summary
    assert "| M | vanilla (3) | 100.00 | – | 100.00 | 3.00 |" in summary
    # paired with `none` on shared questions: adaptive is right on 2 of the 4 simple ones, as `none` is
    assert "| M | adaptive (≤3) | +0.0 (2 → 2 of 4) |" in summary
    assert "| M | vanilla (3) | +50.0 (2 → 4 of 4) |" in summary
    # the same rounds give self-consistency's row: the majority answer
    assert "| M | self_consistency from vanilla (3) | 50.00 | – | 50.00 | 3.00 |" in summary
    curves = report.round_curves(report.with_self_consistency_from_vanilla(report.load(tmp_path)))
    assert curves[("M", "vanilla", 3)]["simple_python"] == [0.0, 50.0, 50.0, 100.0]
    assert curves[("M", report.SC_FROM_VANILLA, 3)]["simple_python"] == [0.0, 50.0, 50.0, 50.0]
    # capped at r rounds, adaptive returns round min(stop, r): right only for odd i once r reaches 3
    assert curves[("M", "adaptive", 3)]["simple_python"] == [0.0, 0.0, 0.0, 50.0]


def test_report_counts_identical_answers_between_models_run_alike(tmp_path) -> None:
    def answered(label: str, mode: str, i: int, content: str | None, args: str | None) -> dict[str, Any]:
        calls = [] if args is None else [{"name": "f", "arguments": args}]
        raw = {"content": content, "tool_calls": calls, "finish_reason": "stop"}
        return _row(mode, "simple_python", i, True, label=label, raw=raw)

    rows = [
        answered("A", "none", 0, None, '{"x": 1}'),
        answered("B", "none", 0, None, '{ "x" : 1 }'),  # the same call, spaced differently
        answered("A", "none", 1, None, '{"x": 1}'),
        answered("B", "none", 1, None, '{"x": 2}'),
        answered("A", "none", 2, " No tool fits. ", None),
        answered("B", "none", 2, "No tool fits.", None),
        answered("A", "none", 3, "only A answered", None),
        answered("A", "adaptive", 0, None, '{"x": 1}'),  # no B row in this mode: no pair
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.agreement(report.load(tmp_path)) == {("A", "B", "none", None): (2, 3)}
    report.write_report(tmp_path)
    assert "| A / B | none | 66.7% (2 of 3) |" in (tmp_path / "summary.md").read_text()
