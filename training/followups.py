"""Samples that continue after a tool result: what an agent loop sends on its second request.

The training sources end at the call; an agent framework then sends the call's result back and expects either the
answer in words or the next call. Without such samples every model here called the same tool again (issue 23).
Made model-aware, in the paper's spirit (the model's own outputs, filtered):

1. the current model writes a plausible JSON result for each call of a calling sample (no tools offered);
2. the current model answers the user's question from those results, with the tools hidden;
3. the answer is kept when it calls nothing, uses the result (repeats one of its values) and is a plain answer: whole
   sentences (not cut off by the token limit), no code or JSON, at most 60 words, and no number of two or more digits
   that is in neither the question, the calls nor the results (the base model otherwise invents sums and prices).

Each kept sample becomes `[user, assistant(calls), tool(results)]` whose target is that answer. A sample with several
calls also gives `[user, assistant(first call), tool(its result)]` whose target is the remaining calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.engine.base import Engine, SamplingParams
from server.prompts import Prompt
from server.toolcalls import ToolCall, parse_answer
from training.data import Sample, seeded_shuffle
from training.resumable import map_resumable, read_records
from training.select import sample_answers

RESULT_PROMPT = (
    "A program called the function `{name}` with these arguments:\n{arguments}\n"
    "Write the JSON object it returned: realistic values, a few fields, on one line. Output only the JSON."
)
ANSWER_SYSTEM = (
    "You are a helpful assistant. Answer the user's question from the tool results you are given, in one or two "
    "sentences, using only values that appear in them. No code, no JSON."
)
MAX_ANSWER_WORDS = 60
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*")
ANSWER_PROMPT = "{question}\n\nTool results:\n{results}"


def conversation(sample: Sample, calls: Sequence[ToolCall], results: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """The sample's question, the assistant's calls, and one `tool` message per result, as an OpenAI client sends."""
    ids = [f"call_{i}" for i in range(len(calls))]
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for i, c in zip(ids, calls, strict=True)
        ],
    }
    tool_turns = [{"role": "tool", "tool_call_id": i, "content": r} for i, r in zip(ids, results, strict=True)]
    return (*sample.messages, assistant, *tool_turns)


def _single_turn(sample: Sample) -> bool:
    return all(m["role"] in ("system", "user") for m in sample.messages)


def uses_result(answer: str, results: Sequence[str]) -> bool:
    """Whether the answer repeats a value of the results: a number, or a string value of 3+ characters."""
    text = answer.lower()
    for result in results:
        for value in _values(json.loads(result)):
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)):
                if re.search(rf"(?<![\d.]){re.escape(_number(value))}(?![\d])", answer):
                    return True
            elif len(value := str(value).strip()) >= 3 and value.lower() in text:
                return True
    return False


def unplain(answer: str, context: str) -> str | None:
    """Why the answer is not a plain answer in words grounded in `context` (question, calls, results); None if it is."""
    if "{" in answer or "```" in answer:
        return "code or JSON"
    if not answer.rstrip().endswith((".", "!", "?", '"')):
        return "cut off"
    if len(answer.split()) > MAX_ANSWER_WORDS:
        return "too long"
    known = {n.replace(",", "") for n in _NUMBER.findall(context)}
    made_up = [n for n in _NUMBER.findall(answer) if len(n.lstrip("-")) > 1 and n.replace(",", "") not in known]
    return f"made-up number {made_up[0]}" if made_up else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _values(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [v for item in node.values() for v in _values(item)]
    if isinstance(node, list):
        return [v for item in node for v in _values(item)]
    return [node]


def _json_object(text: str) -> str | None:
    """The first JSON object in the model's text, compact; None when there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return json.dumps(obj, ensure_ascii=False) if isinstance(obj, dict) and obj else None


def candidates(samples: Sequence[Sample], count: int) -> list[Sample]:
    """The calling samples follow-ups are made from: a seeded choice of `count`."""
    return [s for s in seeded_shuffle(samples, "followups") if s.ground_truth and _single_turn(s)][:count]


async def write_followups(
    engine: Engine,
    samples: Sequence[Sample],
    count: int,
    records_path: Path,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 160,
    concurrency: int = 8,
    progress: bool = True,
) -> None:
    """Generate each candidate's results and answer into `records_path` (resumable: done ones are skipped)."""

    async def generate(messages: list[dict[str, Any]], max_tokens: int) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        (text,) = await sample_answers(engine, Prompt(tuple(messages)), params, adapter)
        return text

    async def one(sample: Sample) -> dict[str, Any]:
        calls = [truth.preferred() for truth in sample.ground_truth]
        results = []
        for call in calls:
            prompt = RESULT_PROMPT.format(name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False))
            result = _json_object(await generate([{"role": "user", "content": prompt}], 96))
            if result is None:
                return {"kept": False, "why": "no JSON result"}
            results.append(result)
        question = ANSWER_PROMPT.format(question=sample.query, results="\n".join(results))
        answer = (
            await generate(
                [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": question}], max_new_tokens
            )
        ).strip()
        if not answer or parse_answer(answer).tool_calls or not uses_result(answer, results):
            why: str | None = "answer unused"
        else:
            why = unplain(answer, "\n".join([sample.query, *(json.dumps(c.arguments) for c in calls), *results]))
        return {"kept": why is None, "results": results, "answer": answer, "why": why}

    await map_resumable(
        candidates(samples, count),
        lambda s: s.id,
        one,
        records_path,
        concurrency=concurrency,
        desc="followups",
        progress=progress,
    )


def followup_samples(samples: Sequence[Sample], count: int, records_path: Path) -> list[Sample]:
    """The follow-up samples the records allow (see the module docstring)."""
    records = read_records(records_path)
    out: list[Sample] = []
    for sample in candidates(samples, count):
        record = records.get(sample.id) or {}
        if not record.get("results"):
            continue
        calls = [truth.preferred() for truth in sample.ground_truth]
        if record["kept"]:
            out.append(
                Sample(
                    f"{sample.id}>answer",
                    f"{sample.source}:followup_answer",
                    conversation(sample, calls, record["results"]),
                    sample.tools,
                    (),
                    answer=record["answer"],
                )
            )
        if len(calls) > 1:  # after the first call's result, the remaining calls
            out.append(
                Sample(
                    f"{sample.id}>next",
                    f"{sample.source}:followup_next",
                    conversation(sample, calls[:1], record["results"][:1]),
                    sample.tools,
                    sample.ground_truth[1:],
                )
            )
    return out
