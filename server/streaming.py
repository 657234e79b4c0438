"""Server-Sent Events in OpenAI's `chat.completion.chunk` shape, including tool calls streamed the way OpenAI does:
the first delta of a call carries its index, id, type and name with empty arguments, later deltas carry argument
fragments. Extension fields (`refinement`, `refinement_round`) are ignored by the OpenAI client."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from server.errors import APIError, error_body
from server.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChoiceFinishReason,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionDelta,
    Refinement,
    RefinementRound,
    ToolCallDelta,
    Usage,
    completion_id,
)

log = logging.getLogger(__name__)

# A decided answer is sent in pieces of this many characters, so clients render it the way they render tokens.
PIECE = 24


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


class ChunkFactory:
    """The chunks of one streamed completion (protocol.ChatCompletionChunk, as JSON); they share its id, creation
    time and model."""

    def __init__(self, model: str) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model

    def _chunk(self, choices: list[ChunkChoice], **extension: Any) -> dict[str, Any]:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extension)
        return chunk.model_dump(mode="json")

    def _delta(self, index: int, delta: Delta) -> dict[str, Any]:
        return self._chunk([ChunkChoice(index=index, delta=delta)])

    def role(self, indices: Iterable[int]) -> dict[str, Any]:
        return self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in indices])

    def content(self, index: int, text: str) -> dict[str, Any]:
        return self._delta(index, Delta(content=text))

    def round_report(self, index: int, round_number: int, answer: str | None) -> dict[str, Any]:
        return self._chunk([], refinement_round=RefinementRound(choice=index, round=round_number, answer=answer))

    def answer(self, index: int, message: AssistantMessage) -> list[dict[str, Any]]:
        chunks = [self.content(index, piece) for piece in _pieces(message.content or "")]
        for k, call in enumerate(message.tool_calls or []):
            head = ToolCallDelta(
                index=k, id=call.id, type="function", function=FunctionDelta(name=call.function.name, arguments="")
            )
            chunks.append(self._delta(index, Delta(tool_calls=[head])))
            for piece in _pieces(call.function.arguments):
                fragment = ToolCallDelta(index=k, function=FunctionDelta(arguments=piece))
                chunks.append(self._delta(index, Delta(tool_calls=[fragment])))
        return chunks

    def finish(
        self, index: int, finish_reason: ChoiceFinishReason, refinement: Refinement, logprobs: ChoiceLogprobs | None
    ) -> dict[str, Any]:
        """The last chunk of a choice. It carries the answer's logprobs, all of them (the answer may have been
        decided after the refine loop, and clients join `logprobs.content` across chunks anyway)."""
        choice = ChunkChoice(index=index, delta=Delta(), logprobs=logprobs, finish_reason=finish_reason)
        return self._chunk([choice], refinement=refinement)

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage=usage)


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame chunks as `data:` events and end with `data: [DONE]`; an error mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
    except APIError as exc:
        yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
    except Exception:
        log.exception("stream failed")
        body = error_body("The server had an error while streaming the response.", "server_error")
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
