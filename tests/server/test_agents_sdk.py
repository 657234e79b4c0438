"""The OpenAI Agents SDK, unmodified, against the real server: it speaks the Responses API (strict tool schemas with
pydantic's `$defs`, function_call_output items, structured output through `text.format`)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from pydantic import BaseModel, Field

from tests.conftest import RunningServer


class Address(BaseModel):
    city: str = Field(max_length=32)
    country: str = Field(max_length=32)


class Booking(BaseModel):
    guest: str = Field(max_length=32)
    nights: int
    address: Address


@pytest.fixture(scope="module")
def model(smol_server: RunningServer) -> Iterator[OpenAIResponsesModel]:
    set_tracing_disabled(True)  # traces go to OpenAI's servers, which tests never reach
    client = openai.AsyncOpenAI(base_url=smol_server.v1, api_key=smol_server.api_key, max_retries=0, timeout=300)
    yield OpenAIResponsesModel(model=smol_server.model, openai_client=client)


def test_agent_with_two_function_tools_calls_the_nested_one(model: OpenAIResponsesModel) -> None:
    seen: list[Booking] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    @function_tool
    def book_hotel(booking: Booking) -> str:
        """Book a hotel room."""
        seen.append(booking)
        return f"booked {booking.nights} nights for {booking.guest} in {booking.address.city}"

    agent = Agent(
        name="travel",
        instructions="You book hotels.",
        tools=[get_weather, book_hotel],
        model=model,
        # The forced tool ends the run with its output (a 135M model is not asked to write the final words).
        model_settings=ModelSettings(tool_choice="book_hotel", max_tokens=128),
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_sync(agent, "Book two nights in Lyon, France for Ada.", run_config=RunConfig(model=model))
    assert len(seen) == 1 and isinstance(seen[0].address, Address)  # the SDK validated the nested arguments
    assert result.final_output == f"booked {seen[0].nights} nights for {seen[0].guest} in {seen[0].address.city}"


def test_agent_with_a_structured_output_type(model: OpenAIResponsesModel) -> None:
    agent = Agent(
        name="extractor",
        instructions="Extract the booking.",
        model=model,
        output_type=Booking,
        model_settings=ModelSettings(max_tokens=128),
    )
    result = Runner.run_sync(agent, "Ada stays two nights at a hotel in Lyon, France.")
    assert isinstance(result.final_output, Booking)  # the SDK parsed and validated the strict JSON answer
    assert isinstance(result.final_output.address, Address)
