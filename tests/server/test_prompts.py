"""Prompt rendering: the paper's system and refine prompts, multi-turn tool calls, the native format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.prompts import REFINE_PROMPT, PromptFormat, build_prompt, system_prompt

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "math.factorial",
            "description": "Factorial of a number.",
            "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
        },
    }
]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Today is 2026-11-23."},
    {"role": "user", "content": "What is 5! ?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "math.factorial", "arguments": '{"number": 5}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "120"},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "6! ?"}]},
]


def test_refine_prompt_is_the_papers() -> None:
    assert REFINE_PROMPT == (
        "Please refine your answer. Directly output the refined answer, "
        "or the original answer if you think it is already perfect."
    )


def test_system_prompt_lists_functions_as_json_and_other_information() -> None:
    text = system_prompt([TOOLS[0]["function"]], "Today is 2026-11-23.")
    assert text.startswith("You are an expert in composing functions.")
    assert "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]" in text
    listed = text.split("Here is a list of functions in JSON format that you can invoke.\n", 1)[1]
    functions_json, other = listed.rsplit("\n", 1)
    assert json.loads(functions_json) == [TOOLS[0]["function"]]
    assert other == "Today is 2026-11-23."


def test_pythonic_multi_turn() -> None:
    prompt = build_prompt(CONVERSATION, TOOLS, PromptFormat.PYTHONIC)
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system", "user", "assistant", "user", "user"]
    system = prompt.messages[0]["content"]
    assert '"name": "math.factorial"' in system and system.endswith("Today is 2026-11-23.")
    assert prompt.messages[2]["content"] == "[math.factorial(number=5)]"
    results = prompt.messages[3]["content"]
    assert results.startswith("Tool results:\n")
    assert json.loads(results.split("\n", 1)[1]) == [{"name": "math.factorial", "results": "120"}]
    assert prompt.messages[4]["content"] == "And 6! ?"
    assert prompt.tools is None


def test_pythonic_without_tools_keeps_a_plain_chat() -> None:
    prompt = build_prompt(CONVERSATION[:2], None, PromptFormat.PYTHONIC)
    assert prompt.messages == ({"role": "system", "content": "Today is 2026-11-23."}, CONVERSATION[1])


def test_refinement_context_appends_previous_answer_and_refine_prompt() -> None:
    prompt = build_prompt(CONVERSATION[:2], TOOLS)
    refined = prompt.with_refinement("[math.factorial(number=5)]")
    assert refined.messages[: len(prompt.messages)] == prompt.messages
    assert refined.messages[len(prompt.messages) :] == (
        {"role": "assistant", "content": "[math.factorial(number=5)]"},
        {"role": "user", "content": REFINE_PROMPT},
    )


def test_native_format_passes_tools_and_structured_calls() -> None:
    prompt = build_prompt(CONVERSATION, TOOLS, PromptFormat.NATIVE)
    assert prompt.tools == tuple(TOOLS)
    assistant = prompt.messages[2]
    assert assistant["tool_calls"] == [
        {"type": "function", "function": {"name": "math.factorial", "arguments": {"number": 5}}}
    ]
    assert prompt.messages[3] == {"role": "tool", "content": "120", "tool_call_id": "call_a"}


def test_bad_prior_arguments_raise_value_error() -> None:
    bad = [{**CONVERSATION[2], "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{nope"}}]}]
    with pytest.raises(ValueError):
        build_prompt(bad, TOOLS)


def test_names_python_cannot_spell_fall_back_to_json_calls() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "get-weather", "arguments": '{"city": "Oslo"}'}}
    prompt = build_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}], TOOLS)
    assert '"name": "get-weather"' in prompt.messages[-1]["content"]
