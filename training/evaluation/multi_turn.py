"""BFCL's multi-turn category `multi_turn_base`, run through `/v1/chat/completions` as an agent framework runs it.

A question is a conversation of user turns over stateful Python backends (BFCL's file system, trading bot, travel
booking, ...), whose methods are offered as `tools`. Each turn appends the user's message(s) and asks the model; the
tool calls of an answer are executed against the backends (BFCL's `execute_multi_turn_func_call`) and go back as one
`tool` message per call, and the model is asked again, until it answers without calls (the turn ends) or is still
calling tools past the step cap (the question is force-terminated, as BFCL's own handlers do). The calls of every
step are then scored by BFCL's `multi_turn_checker`, which replays them and the ground truth on fresh backends and
compares, after each turn, the backends' states and the execution results. The checker also runs after each turn
but the last, on the turns so far: a question stops at its first failing turn, with the verdict the whole
conversation would get (the later turns cannot change it; for a weak model most of the time is saved).

Calls are converted to BFCL's pythonic strings by BFCL's own OpenAI decoder (`convert_to_function_call`), so scoring
sees what BFCL's `gpt-*-FC` handlers would hand it. Only calls to an offered function with identifier keywords are
executed: BFCL `eval`s the strings, and a model must not get to run `open(file=..., mode='w')`; any other call gets an
error message as its result and is left out of what the checker replays.
"""

from __future__ import annotations

import copy
import itertools
import json
import keyword
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from server.refine import RefineMode
from training.evaluation import bfcl
from training.resumable import read_jsonl

if TYPE_CHECKING:
    from training.evaluation.runner import EvalConfig

CATEGORIES = ("multi_turn_base",)
MAX_STEPS = 20  # BFCL's MAXIMUM_STEP_LIMIT (bfcl_eval.constants.default_prompts)
RESULT_CHARS = 500  # an execution result as kept in the row (the model gets it whole)


@dataclass(frozen=True, eq=False)
class Question:
    id: str
    category: str
    turns: list[list[dict[str, Any]]]  # each turn's user message(s)
    functions: list[dict[str, Any]]  # BFCL's docs of the involved classes' methods
    initial_config: dict[str, Any]
    involved_classes: list[str]
    ground_truth: list[list[str]]  # per turn, the calls that solve it

    def tools(self, underscore_names: bool = False) -> list[dict[str, Any]]:
        return bfcl.openai_tools(self.functions, underscore_names)

    def name_map(self, underscore_names: bool = False) -> dict[str, str]:
        """Tool name as sent -> BFCL's name (multi-turn names have no dots, so the same; kept for symmetry)."""
        return {
            t["function"]["name"]: f["name"] for t, f in zip(self.tools(underscore_names), self.functions, strict=True)
        }

    def entry(self) -> dict[str, Any]:
        """The test entry BFCL's checker reads."""
        return {"id": self.id, "initial_config": self.initial_config, "involved_classes": self.involved_classes}


# ---------------------------------------------------------------------------------------------------- data


@cache
def class_functions(class_name: str) -> tuple[dict[str, Any], ...]:
    """A backend class's function docs, from the file BFCL maps it to (`MULTI_TURN_FUNC_DOC_FILE_MAPPING`)."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = files("bfcl_eval").joinpath("data", "multi_turn_func_doc", MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name])
    return tuple(read_jsonl(path, missing_ok=False))


@cache
def load_category(category: str) -> tuple[Question, ...]:
    """A multi-turn category's questions, with their classes' functions as BFCL assembles them (in class order)."""
    if category not in CATEGORIES:
        raise ValueError(f"unsupported multi-turn category {category!r}; choose from {', '.join(CATEGORIES)}")
    question_file, answer_file = bfcl.category_files(category)
    answers = {a["id"]: a["ground_truth"] for a in read_jsonl(answer_file, missing_ok=False)}
    questions = []
    for row in read_jsonl(question_file, missing_ok=False):
        functions = [copy.deepcopy(f) for name in row["involved_classes"] for f in class_functions(name)]
        questions.append(
            Question(
                id=row["id"],
                category=category,
                turns=row["question"],
                functions=functions,
                initial_config=row.get("initial_config", {}),
                involved_classes=row["involved_classes"],
                ground_truth=answers[row["id"]],
            )
        )
    return tuple(questions)


def subset(category: str, limit: int | None = None, seed: int = bfcl.DEFAULT_SEED) -> list[Question]:
    """The same `limit` questions every time, nested across limits (`bfcl.subset`)."""
    return bfcl.nested_subset(load_category(category), category, limit, seed)


# ---------------------------------------------------------------------------------------------------- calls


def call_string(name: str, arguments: dict[str, Any]) -> str:
    """One call as BFCL's OpenAI function-calling decoder writes it: `name(k=repr(v),...)`."""
    from bfcl_eval.model_handler.utils import convert_to_function_call

    return convert_to_function_call([{name: arguments}])[0]


def _refusal(name: str, arguments: dict[str, Any], offered: set[str]) -> str | None:
    """Why a call is not executed (None: it is): BFCL `eval`s call strings, so only offered functions run."""
    if name not in offered:
        return f"Error during execution: {name!r} is not one of the offered functions."
    bad = [k for k in arguments if not (k.isidentifier() and not keyword.iskeyword(k))]
    if bad:
        return f"Error during execution: {bad[0]!r} is not a valid argument name."
    return None


def _backend_key() -> str:
    """A fresh name for one question's backend instances (BFCL keeps them in module globals by model and test id)."""
    return f"toolace_r_{uuid.uuid4().hex}"


def _release(key: str) -> None:
    """Drop the backend instances made under `key` (inference, and the checker's `_eval` replays)."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    store = vars(multi_turn_utils)
    for name in [n for n in list(store) if n.startswith(f"{key}_")]:
        store.pop(name, None)


def _execute(calls: list[str], question: Question, key: str) -> list[str]:
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    results, _ = execute_multi_turn_func_call(
        calls, question.initial_config, question.involved_classes, key, question.id, long_context=False
    )
    return results


# ---------------------------------------------------------------------------------------------------- scoring


def score(question: Question, decoded: list[list[list[str]]], key: str, turns: int | None = None) -> bfcl.Score:
    """BFCL's `multi_turn_checker` over `decoded` (per turn, per step with calls, the call strings), for the first
    `turns` turns (all by default); `key` names the checker's backend instances."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    ground_truth = question.ground_truth[: len(question.ground_truth) if turns is None else turns]
    if len(decoded) != len(ground_truth):  # BFCL's eval runner: the model was force-terminated
        message = f"The model result has {len(decoded)} turns, the ground truth {len(ground_truth)}."
        return bfcl.Score(False, "multi_turn:force_terminated", message)
    try:
        result = multi_turn_checker(decoded, ground_truth, question.entry(), question.category, key)
    except Exception as exc:  # noqa: BLE001 - the checker asserts on states it assumes well-formed
        return bfcl.Score(False, "checker_exception", f"{type(exc).__name__}: {exc}"[:500])
    if result["valid"]:
        return bfcl.Score(True)
    error = {"message": result.get("error_message"), "details": result.get("details")}
    return bfcl.Score(False, result.get("error_type"), json.dumps(error, default=str)[:500])


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class _Play:
    """One question's conversation as it is played: what is sent, and what is recorded of it."""

    question: Question
    config: EvalConfig
    base: dict[str, Any]  # the request fields every request carries (model, tools, sampling, refinement)
    name_map: dict[str, str]  # tool name as sent -> BFCL's name
    key: str  # the question's backends (BFCL keeps them by this key)
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[list[dict[str, Any]]] = field(default_factory=list)  # per turn, per request: what was said and ran
    decoded: list[list[list[str]]] = field(default_factory=list)  # per turn, per step with calls: what is replayed
    request_ids: list[str] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )

    def turn(self, client: Any, user_messages: list[dict[str, Any]]) -> bfcl.Score | None:
        """Play one user turn to its end; a Score when it ends the question early (a 4xx, force-terminated)."""
        import openai

        from training.evaluation.runner import rejection

        self.messages.extend(copy.deepcopy(user_messages))
        steps: list[dict[str, Any]] = []
        scored: list[list[str]] = []
        self.turns.append(steps)
        self.decoded.append(scored)
        for executed in itertools.count(1):
            try:
                response = client.chat.completions.create(messages=self.messages, **self.base)
            except openai.APIStatusError as exc:
                return bfcl.Score(False, rejection(exc), str(exc)[:500])
            tool_calls, step = self._record(response)
            steps.append(step)
            if not tool_calls:
                return None  # a text answer ends the turn
            calls, decode_error = bfcl.calls_from_tool_calls(tool_calls, self.name_map)
            if decode_error is not None:  # as BFCL's handlers: an answer that does not decode ends the turn
                step["error"] = decode_error
                return None
            assert calls is not None  # no decode error: calls
            if runnable := self._run(calls, tool_calls, step):
                scored.append(runnable)
            if executed > self.config.max_steps:  # BFCL: still calling after max_steps + 1 steps: force-terminated
                message = f"Still calling tools after {executed} steps in turn {len(self.turns) - 1}."
                return bfcl.Score(False, "multi_turn:force_terminated", message)
        raise AssertionError("unreachable")

    def _record(self, response: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Take in one answer: its calls, and the step recorded for it (the assistant turn joins the messages)."""
        self.request_ids.append(response.id)
        if response.usage:
            for k in self.usage:
                self.usage[k] += getattr(response.usage, k, 0) or 0
        refinement = (response.model_extra or {}).get("refinement") or {}
        if "iterations" in refinement:
            self.rounds.append(refinement["iterations"])
        message = response.choices[0].message
        tool_calls = [tc.model_dump() for tc in (message.tool_calls or [])]
        assistant: dict[str, Any] = {
            "role": "assistant",
            "content": message.content or ("" if not tool_calls else None),
        }
        if tool_calls:
            assistant["tool_calls"] = [
                {"id": tc["id"], "type": "function", "function": tc["function"]} for tc in tool_calls
            ]
        self.messages.append(assistant)
        step: dict[str, Any] = {"content": message.content, "calls": [], "results": []}
        if refinement:
            step.update(rounds=refinement.get("iterations"), stop_reason=refinement.get("stop_reason"))
        return tool_calls, step

    def _run(self, calls: list[dict[str, Any]], tool_calls: list[dict[str, Any]], step: dict[str, Any]) -> list[str]:
        """Execute an answer's calls (offered ones only: the others get an error as their result); each result
        goes back as a `tool` message. Returns the calls that ran."""
        offered = set(self.name_map.values())
        texts = [call_string(name, args) for call in calls for name, args in call.items()]
        refusals = [_refusal(name, args, offered) for call in calls for name, args in call.items()]
        runnable = [t for t, r in zip(texts, refusals, strict=True) if r is None]
        ran = iter(_execute(runnable, self.question, self.key) if runnable else [])
        results = [r if r is not None else next(ran) for r in refusals]
        for tc, output in zip(tool_calls, results, strict=True):
            self.messages.append({"role": "tool", "content": output, "tool_call_id": tc["id"]})
        step.update(calls=texts, results=[r[:RESULT_CHARS] for r in results])
        return runnable


def ask(client: Any, config: EvalConfig, mode: str, question: Question, label: str) -> dict[str, Any]:
    """Play one question through `client.chat.completions.create` and score it; the row to write.

    Connection errors, 5xx and the like propagate (the runner retries the question next run); a 4xx that is the
    question's fault (a conversation past the context length) ends it as an invalid row.
    """
    played = question.turns[: config.max_turns] if config.max_turns else question.turns
    fields = config.request_fields(mode, question.tools(config.underscore_names))
    play = _Play(question, config, fields, question.name_map(config.underscore_names), _backend_key())
    started = time.monotonic()
    try:
        result = None
        for turn, user_messages in enumerate(played, 1):
            if result := play.turn(client, user_messages):
                break
            # BFCL's checker fails a question at its first wrong turn, and a turn's verdict depends only on the turns
            # up to it: a question whose played turns already fail has its verdict, and the rest is not played.
            # Each check replays on fresh backends (BFCL keeps instances by name), released with the question's.
            if turn < len(played) and not (checked := score(question, play.decoded, f"{play.key}_{turn}", turn)).valid:
                result = checked
                break
        latency = time.monotonic() - started
        result = result or score(question, play.decoded, play.key, len(played))
    finally:
        _release(play.key)
    rounds = play.rounds
    return config.row_head(mode, question, label) | {
        "request_id": play.request_ids[-1] if play.request_ids else None,
        "requests": len(play.request_ids),
        "latency_s": round(latency, 3),
        "turns": play.turns,
        "calls": play.decoded,
        "max_turns": config.max_turns,
        "valid": result.valid,
        "error_type": result.error_type,
        "error": result.error,
        # the leading turns the checker passed: every turn before the last one played was checked and passed
        "turns_right": len(play.turns) - (0 if result.valid else 1),
        # refine rounds per request, averaged over the question's requests (`none`: 0)
        "rounds": 0 if mode == RefineMode.NONE else (round(sum(rounds) / len(rounds), 3) if rounds else None),
        "stop_reason": None,
        "usage": play.usage if play.request_ids else None,
    }
