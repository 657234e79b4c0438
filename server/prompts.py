"""The paper's prompts and the rendering of an OpenAI conversation into model chat messages.

Two formats:
- `pythonic` (default): the ToolACE/ToolACE-R system prompt lists the functions as JSON and asks for
  `[f(a=1), g(b=2)]`; prior tool calls are rendered the same way, tool results as a user turn.
- `native`: the model's own chat template receives `tools` (Qwen: `<tools>` and `<tool_call>` hermes blocks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server import toolcalls

# The system prompt of ToolACE, which ToolACE-R uses for tool invocation; `{other_information}` carries extra
# context such as the date, and here also any system message the client sent.
SYSTEM_PROMPT = "\n".join(
    [
        "You are an expert in composing functions. You are given a question and a set of possible functions. ",
        "Based on the question, you will need to make one or more function/tool calls to achieve the purpose. ",
        "If none of the function can be used, point it out. If the given question lacks the parameters required "
        "by the function,",
        "also point it out. You should only return the function call in tools call sections.",
        "If you decide to invoke any of the function(s), you MUST put it in the format of "
        "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]",
        "You SHOULD NOT include any other text in the response.",
        "Here is a list of functions in JSON format that you can invoke.",
        "{functions}",
        "{other_information}",
    ]
)

# The paper's refine prompt (Algorithm 1), word for word.
REFINE_PROMPT = (
    "Please refine your answer. Directly output the refined answer, "
    "or the original answer if you think it is already perfect."
)


class PromptFormat(StrEnum):
    PYTHONIC = "pythonic"
    NATIVE = "native"


@dataclass(frozen=True)
class Prompt:
    """What the engine renders with the chat template: messages, plus `tools` for the native format."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None

    def with_refinement(self, previous_answer: str) -> Prompt:
        """The context of a refine round: the conversation, the previous answer, then the refine prompt."""
        extra = (
            {"role": "assistant", "content": previous_answer},
            {"role": "user", "content": REFINE_PROMPT},
        )
        return Prompt(self.messages + extra, self.tools)


def text_of(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI content parts (text parts only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def system_prompt(functions: Sequence[Mapping[str, Any]], other_information: str = "") -> str:
    return SYSTEM_PROMPT.format(
        functions=json.dumps(list(functions), indent=4, ensure_ascii=False),
        other_information=other_information,
    ).rstrip("\n")


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    fmt: PromptFormat = PromptFormat.PYTHONIC,
) -> Prompt:
    """Turn validated OpenAI messages (+ tools) into chat messages for the model."""
    if fmt is PromptFormat.NATIVE:
        return Prompt(tuple(_native_message(m) for m in messages), tuple(dict(t) for t in tools) if tools else None)
    return Prompt(tuple(_pythonic_messages(messages, tools)))


def _pythonic_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    system_texts = [text_of(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    out: list[dict[str, Any]] = []
    if tools:
        functions = [t["function"] for t in tools]
        out.append({"role": "system", "content": system_prompt(functions, "\n".join(system_texts))})
    elif system_texts:
        out.append({"role": "system", "content": "\n".join(system_texts)})
    call_names: dict[str, str] = {}
    pending_results: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role in ("system", "developer"):
            continue
        if role == "tool":
            call_id = message.get("tool_call_id") or ""
            pending_results.append(
                {
                    "name": call_names.get(call_id, message.get("name") or ""),
                    "results": text_of(message.get("content")),
                }
            )
            continue
        if pending_results:
            out.append(_tool_results_turn(pending_results))
            pending_results = []
        if role == "assistant" and message.get("tool_calls"):
            calls = toolcalls.from_openai(message["tool_calls"])
            call_names.update({c.get("id", ""): c["function"]["name"] for c in message["tool_calls"] if c.get("id")})
            out.append({"role": "assistant", "content": _render_calls(calls)})
        else:
            out.append({"role": role, "content": text_of(message.get("content"))})
    if pending_results:
        out.append(_tool_results_turn(pending_results))
    return out


def _render_calls(calls: Sequence[toolcalls.ToolCall]) -> str:
    try:
        return toolcalls.render_pythonic(calls)
    except ValueError:  # a name Python cannot spell (`get-weather`): the JSON form still tells the model
        return toolcalls.render_hermes(calls)


def _tool_results_turn(results: list[dict[str, Any]]) -> dict[str, Any]:
    # Small models rarely know a `tool` role; a user turn with the results as JSON reads the same everywhere.
    return {"role": "user", "content": "Tool results:\n" + json.dumps(results, ensure_ascii=False)}


def _native_message(message: Mapping[str, Any]) -> dict[str, Any]:
    role = "system" if message["role"] == "developer" else message["role"]
    out: dict[str, Any] = {"role": role, "content": text_of(message.get("content"))}
    if role == "assistant" and message.get("tool_calls"):
        # HF chat templates expect arguments as a mapping, not OpenAI's JSON string.
        out["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in toolcalls.from_openai(message["tool_calls"])
        ]
    if role == "tool":
        if message.get("tool_call_id"):
            out["tool_call_id"] = message["tool_call_id"]
        if message.get("name"):
            out["name"] = message["name"]
    return out
