"""BFCL's questions, function docs and possible answers, and BFCL's own AST checker over OpenAI tool calls.

Everything BFCL-specific lives here: loading `bfcl_eval/data`, the deterministic subsets, turning BFCL function docs
into OpenAI `tools` the way BFCL's own function-calling handlers do, and scoring a list of calls
`[{name: {param: value}}]` with `bfcl_eval`'s `ast_checker` (irrelevance: no call is right).
"""

from __future__ import annotations

import copy
import json
import random
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from training.resumable import read_jsonl

NON_LIVE = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance")
SUPPORTED = NON_LIVE + LIVE
# Executable categories BFCL no longer scores (`data/unused_datasets/`): training data only.
EXEC = ("exec_simple", "exec_multiple", "exec_parallel", "exec_parallel_multiple")
DEFAULT_SEED = 0

# A model name the checker looks up for `underscore_to_dot`; we always hand it the original (dotted) names.
_CHECKER_MODEL = "toolace-r-eval"


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    messages: list[dict[str, Any]]  # the first (only) turn of a single-turn question
    functions: list[dict[str, Any]]  # BFCL's original docs: what the checker reads
    ground_truth: list[dict[str, Any]] | None  # None for (ir)relevance

    def tools(self, underscore_names: bool = False) -> list[dict[str, Any]]:
        return openai_tools(self.functions, underscore_names)

    def name_map(self, underscore_names: bool = False) -> dict[str, str]:
        """Tool name as sent -> BFCL's name."""
        return {_sent_name(f["name"], underscore_names): f["name"] for f in self.functions}


@dataclass(frozen=True)
class Score:
    valid: bool
    error_type: str | None = None
    error: str | None = None


def _data_file(*parts: str):
    return files("bfcl_eval").joinpath("data", *parts)


def category_files(category: str):
    """A category's questions and possible answers: in bfcl_eval's data, or among its unused datasets (exec_*)."""
    name = f"BFCL_v4_{category}.json"
    if _data_file(name).is_file():
        return _data_file(name), _data_file("possible_answer", name)
    return _data_file("unused_datasets", "question", name), _data_file("unused_datasets", "possible_answer", name)


def _rows(path) -> list[dict[str, Any]]:
    return list(read_jsonl(path, missing_ok=False))


def read_rows(category: str) -> list[dict[str, Any]]:
    """A category's raw question rows (any category, multi-turn ones included)."""
    return _rows(category_files(category)[0])


def is_irrelevance(category: str) -> bool:
    return "irrelevance" in category


def is_relevance(category: str) -> bool:
    return category.endswith("relevance") and not is_irrelevance(category)


@cache
def load_category(category: str) -> tuple[Question, ...]:
    """A single-turn category's questions (the training loader reads the exec_* ones through here too)."""
    if category not in SUPPORTED + EXEC:
        raise ValueError(f"unsupported BFCL category {category!r}; choose from {', '.join(SUPPORTED + EXEC)}")
    question_file, answer_file = category_files(category)
    rows = _rows(question_file)
    answers: dict[str, Any] = {}
    if not (is_irrelevance(category) or is_relevance(category)):
        answers = {a["id"]: a["ground_truth"] for a in _rows(answer_file)}
    questions = []
    for row in rows:
        if len(row["question"]) != 1:
            raise ValueError(f"{row['id']}: multi-turn questions are not supported")
        questions.append(
            Question(
                id=row["id"],
                category=category,
                messages=row["question"][0],
                functions=row["function"],
                ground_truth=answers.get(row["id"]),
            )
        )
    return tuple(questions)


def subset(category: str, limit: int | None = None, seed: int = DEFAULT_SEED) -> list[Question]:
    """The same `limit` questions of a category every time: a fixed-seed shuffle, its first `limit`, in data order.

    Subsets are nested: the questions of `--limit 50` are among those of `--limit 100`, so a run can be extended.
    """
    return nested_subset(load_category(category), category, limit, seed)


def nested_subset(questions: Sequence[Any], category: str, limit: int | None, seed: int = DEFAULT_SEED) -> list[Any]:
    """`subset`'s fixed, nested choice over any category's questions (the multi-turn ones too)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    order = list(range(len(questions)))
    random.Random(f"bfcl:{category}:{seed}").shuffle(order)
    return [questions[i] for i in sorted(order[:limit])]


# ---------------------------------------------------------------------------------------------------- tools


def _sent_name(name: str, underscore_names: bool) -> str:
    return name.replace(".", "_") if underscore_names else name


def openai_tools(functions: list[dict[str, Any]], underscore_names: bool = False) -> list[dict[str, Any]]:
    """BFCL docs as OpenAI `tools`, converted exactly as BFCL's OpenAI function-calling handler does.

    BFCL adds "Note that the provided function is in Python 3 syntax." to each description and maps its types to
    JSON Schema (`dict`->object, `float`->number with a float note, `tuple`->array, `any`->string, matching its
    checker, which reads `any` as str). BFCL renames `math.factorial` to `math_factorial` for OpenAI; we keep the
    dotted names unless `underscore_names` (for servers that reject dots).
    """
    from bfcl_eval.constants.enums import ModelStyle
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.model_handler.utils import convert_to_tool
    from bfcl_eval.utils import add_language_specific_hint_to_function_doc

    entry = {"id": "simple_python_0", "function": copy.deepcopy(functions)}  # the id only selects the Python hint
    hinted = add_language_specific_hint_to_function_doc([entry])[0]["function"]
    tools = convert_to_tool(hinted, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)
    for tool, function in zip(tools, functions, strict=True):
        tool["function"]["name"] = _sent_name(function["name"], underscore_names)
    return tools


# ---------------------------------------------------------------------------------------------------- checker


@cache
def _checker():
    """BFCL's `ast_checker`, imported without `bfcl_eval.constants.model_config` (which imports every vendor SDK)."""
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)
        vars(stand_in)["MODEL_CONFIG_MAPPING"] = {}
        sys.modules[name] = stand_in
    from bfcl_eval.eval_checker.ast_eval import ast_checker as module

    # The checker reads MODEL_CONFIG_MAPPING[model].underscore_to_dot; the names it sees are always BFCL's own.
    module.MODEL_CONFIG_MAPPING.setdefault(_CHECKER_MODEL, types.SimpleNamespace(underscore_to_dot=False))
    return module.ast_checker


def _is_call_list(calls: Any) -> bool:
    from bfcl_eval.utils import is_function_calling_format_output

    return is_function_calling_format_output(calls)


def score(question: Question, calls: list[dict[str, Any]] | None, decode_error: str | None = None) -> Score:
    """Score the calls `[{name: {param: value}}]` a model made (`[]`: no call; None with `decode_error`: unreadable).

    Irrelevance: right iff no call (as BFCL: an answer that does not decode to calls counts as no call).
    Relevance: right iff at least one call. The rest: BFCL's `ast_checker` against the possible answers.
    """
    from bfcl_eval.constants.enums import Language

    has_calls = bool(calls and not (len(calls) == 1 and not calls[0]))
    if is_irrelevance(question.category):
        if has_calls and decode_error is None:
            return Score(False, "irrelevance_error:decoder_success", "Made a function call when none was relevant.")
        return Score(True)
    if is_relevance(question.category):
        return Score(True) if has_calls and decode_error is None else Score(False, "relevance_error:no_tool_call")
    if decode_error is not None:
        return Score(False, "ast_decoder:decoder_failed", decode_error)
    if not calls:
        return Score(False, "ast_decoder:no_tool_call", "The answer has no tool call.")
    if not _is_call_list(calls):
        return Score(False, "ast_decoder:decoder_wrong_output_format", repr(calls)[:500])
    try:
        result = _checker()(
            question.functions, calls, question.ground_truth, Language.PYTHON, question.category, _CHECKER_MODEL
        )
    except Exception as exc:  # noqa: BLE001 - the checker indexes into answers it assumes well-formed
        return Score(False, "checker_exception", f"{type(exc).__name__}: {exc}"[:500])
    if result["valid"]:
        return Score(True)
    error = result.get("error")
    return Score(False, result.get("error_type"), json.dumps(error, default=str)[:500] if error else None)


def calls_from_tool_calls(
    tool_calls: list[dict[str, Any]], name_map: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """OpenAI `message.tool_calls` (arguments as JSON text) -> `[{name: {param: value}}]`, or (None, error)."""
    calls = []
    for index, call in enumerate(tool_calls):
        function = call.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return None, f"tool_calls[{index}] has no function name"
        arguments = function.get("arguments")
        try:
            args = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else (arguments or {})
        except ValueError as exc:
            return None, f"tool_calls[{index}].arguments is not JSON: {exc}"
        if not isinstance(args, dict):
            return None, f"tool_calls[{index}].arguments is not a JSON object"
        calls.append({(name_map or {}).get(name, name): args})
    return calls, None


def calls_from_text(text: str, offered: set[str]) -> list[dict[str, Any]]:
    """One refine round's raw text -> calls, read as our server reads it (a call to a tool not offered: no calls)."""
    from server import toolcalls

    parsed = toolcalls.parse_answer(text)
    if not parsed.tool_calls or not all(call.name in offered for call in parsed.tool_calls):
        return []
    return [{call.name: call.arguments} for call in parsed.tool_calls]


def canonical_text(text: str) -> str:
    """The server's canonical form of an answer (what adaptive and self-consistency compare)."""
    from server import toolcalls

    return toolcalls.canonical(toolcalls.parse_answer(text))
