"""Follow-up samples (after a tool result) from a scripted engine: results and answers written by the model, the
filter that keeps answers using the result, and the conversation as the native template renders it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from server.prompts import PromptFormat
from server.toolcalls import ToolCall, parse_answer
from training.data import GroundTruthCall, Sample
from training.followups import followup_samples, unplain, uses_result, write_followups
from training.matching import answer_matches


def _two_city_sample(sample_id: str) -> Sample:
    one = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    truth = tuple(GroundTruthCall.exact(ToolCall("get_weather", {"city": c})) for c in ("Paris", "Rome"))
    return Sample(sample_id, "test", ({"role": "user", "content": "Weather in Paris and Rome?"},), (one,), truth)


def test_uses_result_needs_a_value_of_the_result() -> None:
    result = json.dumps({"city": "Paris", "temperature": 21, "sky": "sunny", "ok": True})
    assert uses_result("It is 21 degrees in Paris.", [result])
    assert uses_result("Sunny today.", [result])
    assert not uses_result("It is 210 degrees.", [result])  # 21 inside another number is not the value
    assert not uses_result("I cannot tell.", [result])


def test_only_plain_grounded_answers_are_kept() -> None:
    context = 'Weather in Paris?\n{"city": "Paris"}\n{"temperature": 21, "rain_mm": 0.5}'
    assert unplain("It is 21 degrees in Paris, with 0.5 mm of rain.", context) is None
    assert unplain("It is 21 degrees in Paris, 3 days in a row.", context) is None  # one digit: not checked
    assert unplain("It is 21 degrees, 69.8 in Fahrenheit.", context) == "made-up number 69.8"
    assert unplain("It is 21 degrees in Paris and the", context) == "cut off"
    assert unplain('Here it is: {"temperature": 21}.', context) == "code or JSON"
    assert unplain("It is 21 degrees. " + "Nice weather. " * 30, context) == "too long"


def test_followups_answer_after_results_or_make_the_next_call(scripted, make_sample, tmp_path: Path) -> None:  # noqa: ANN001
    def script(messages, params):  # noqa: ANN001, ANN202
        text = messages[-1]["content"]
        assert params.temperature == 0.0
        if text.startswith("A program called"):  # the tool result, written by the model
            city = "Paris" if "Paris" in text else "Rome" if "Rome" in text else "Oslo"
            return [f'Sure: {{"city": "{city}", "temperature": 18}}']
        assert messages[0]["role"] == "system" and "Tool results:" in text  # the answer, tools hidden
        if "Rome" in text:  # a sum no result holds
            return ["It is 18 degrees in Paris and Rome, 36 in all."]
        return ["No idea."] if "Oslo" in text else ["It is 18 degrees there."]

    engine = scripted(script)
    samples = [make_sample("paris", "Paris"), make_sample("oslo", "Oslo"), _two_city_sample("both")]
    path = tmp_path / "followups.jsonl"
    asyncio.run(write_followups(engine, samples, 10, path, progress=False))
    made = {s.id: s for s in followup_samples(samples, 10, path)}
    # Oslo's answer does not use its result; the two-city answer invents a number
    assert set(made) == {"paris>answer", "both>next"}

    answer = made["paris>answer"]
    user, assistant, tool = answer.messages
    (call,) = assistant["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": '{"city": "Paris", "temperature": 18}'}
    assert answer.target(PromptFormat.NATIVE) == "It is 18 degrees there."
    assert not answer.ground_truth and answer_matches("Any words", answer.ground_truth)

    following = made["both>next"]  # after Paris's result: the Rome call
    assert len(following.messages[1]["tool_calls"]) == 1 and following.messages[2]["role"] == "tool"
    assert parse_answer(following.target(PromptFormat.NATIVE)).tool_calls == (
        ToolCall("get_weather", {"city": "Rome"}),
    )

    calls = len(engine.calls)
    asyncio.run(write_followups(engine, samples, 10, path, progress=False))
    assert len(engine.calls) == calls  # resumed from the records: nothing generated again


def test_followup_conversation_renders_tool_responses_in_the_native_template(qwen_tokenizer) -> None:  # noqa: ANN001
    sample = _two_city_sample("both")
    from training.followups import conversation

    calls = [truth.preferred() for truth in sample.ground_truth]
    follow = Sample("f", "test", conversation(sample, calls, ['{"t": 1}', '{"t": 2}']), sample.tools, (), answer="Ok.")
    prompt = follow.prompt(PromptFormat.NATIVE)
    text = qwen_tokenizer.apply_chat_template(
        list(prompt.messages), tools=list(prompt.tools), add_generation_prompt=True, tokenize=False
    )
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"t": 1}\n</tool_response>\n<tool_response>\n{"t": 2}\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
