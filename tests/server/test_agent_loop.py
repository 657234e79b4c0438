"""What a user of the shipped adapter sees: it declines when no tool fits, calls when one does, and after a tool
result it answers in words, so that an agent framework's loop ends (pydantic-ai against the real server).
Issues 17 and 23: every adapter before run 4's called a tool for "Tell me a joke" or called it again after its
result."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import QWEN, RunningServer, start_server
from tests.server.test_qwen import QWEN_DTYPE, SHIPPED_ADAPTER

pytestmark = pytest.mark.qwen

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FACTORIAL = {
    "type": "function",
    "function": {
        "name": "math_factorial",
        "description": "Factorial of a non-negative integer.",
        "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
    },
}
STOCK = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "The latest trading price of a stock, by ticker symbol.",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # The server's own format is pythonic (the default); the adapter is served in the one its manifest names.
    yield from start_server(QWEN, tmp_path_factory.mktemp("agent"), *QWEN_DTYPE)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=300)


def ask(client: openai.OpenAI, messages: list[dict], tools: list[dict]) -> openai.types.chat.ChatCompletionMessage:
    result = client.chat.completions.create(model=SHIPPED_ADAPTER, messages=messages, tools=tools, temperature=0)
    return result.choices[0].message


@pytest.mark.parametrize("question", ["Tell me a joke about cats.", "What is the capital of France?"])
def test_the_adapter_declines_when_no_tool_fits(client: openai.OpenAI, question: str) -> None:
    message = ask(client, [{"role": "user", "content": question}], [WEATHER])
    assert not message.tool_calls, message
    assert message.content and message.content.strip()


def test_the_adapter_calls_the_tool_that_fits(client: openai.OpenAI) -> None:
    message = ask(client, [{"role": "user", "content": "What's the weather in Paris?"}], [WEATHER])
    assert message.tool_calls and len(message.tool_calls) == 1, message
    call = message.tool_calls[0].function
    assert call.name == "get_weather" and "paris" in json.loads(call.arguments)["city"].lower()


@pytest.mark.parametrize(
    ("tool", "question", "arguments", "result", "expected"),
    [
        (WEATHER, "What's the weather in Paris?", {"city": "Paris"}, "Sunny, 21C in Paris", "21"),
        (FACTORIAL, "What is the factorial of 5?", {"number": 5}, "120", "120"),
        (STOCK, "How much is Apple stock trading at?", {"ticker": "AAPL"}, '{"price": 187.42}', "187.42"),
    ],
)
def test_after_a_tool_result_the_adapter_answers_in_words(
    client: openai.OpenAI, tool: dict, question: str, arguments: dict, result: str, expected: str
) -> None:
    name = tool["function"]["name"]
    messages = [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]
    message = ask(client, messages, [tool])
    assert not message.tool_calls, message  # the loop ends: no second call of the same tool
    assert expected in (message.content or ""), message.content


def test_a_pydantic_ai_agent_reaches_an_answer_that_uses_the_tool_results(server: RunningServer) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel(SHIPPED_ADAPTER, provider=OpenAIProvider(base_url=server.v1, api_key=server.api_key))
    agent = Agent(model, model_settings={"temperature": 0.0})
    calls: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        calls.append(city)
        return f"Sunny, 21C in {city}"

    @agent.tool_plain
    def get_stock_price(ticker: str) -> str:
        """The latest trading price of a stock, by ticker symbol."""
        return "187.42"

    result = agent.run_sync("What's the weather in Paris?", usage_limits=UsageLimits(request_limit=4))
    assert calls and "paris" in calls[0].lower()
    assert "21" in result.output, result.output
    assert result.usage.requests <= 4
