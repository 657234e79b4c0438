"""What one request may ask for, checked before any work: each breach is a 400 naming the field.

Refinement multiplies a request's cost by up to `max_refine_iterations + 1`, so caps on tokens, choices, rounds and
tools bound what a single client can make the engine do. HTTP-level limits (body size, JSON nesting) live in
middleware.py; prompt + max_tokens against the context is checked in serving.py with real token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.errors import BadRequest
from server.protocol import ChatCompletionRequest
from server.refine import MAX_ITERATIONS_LIMIT


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    max_tokens: int = 4096
    max_n: int = 8
    max_refine_iterations: int = MAX_ITERATIONS_LIMIT  # a server may lower the protocol's own ceiling, not raise it
    max_tools: int = 128
    max_tool_schema_bytes: int = 32 * 1024
    max_active_requests: int = 32  # running at once (the engine batches them)
    max_queued_requests: int = 256  # waiting for a slot; beyond that, 429
    request_timeout: float = 600.0  # seconds, queueing included; then 504


def check_request(request: ChatCompletionRequest, limits: Limits) -> None:
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise BadRequest(f"{field} is at most {limits.max_tokens} on this server", param=field)
    if request.n > limits.max_n:
        raise BadRequest(f"n is at most {limits.max_n} on this server", param="n")
    # Only when asked for: a request that leaves it out gets the default within the cap (serving.py).
    explicit = "max_refine_iterations" in request.model_fields_set
    if explicit and request.max_refine_iterations > limits.max_refine_iterations:
        raise BadRequest(
            f"max_refine_iterations is at most {limits.max_refine_iterations} on this server",
            param="max_refine_iterations",
        )
    tools = request.tools or []
    if len(tools) > limits.max_tools:
        raise BadRequest(f"at most {limits.max_tools} tools per request", param="tools")
    for i, tool in enumerate(tools):
        size = len(json.dumps(tool.function.parameters or {}))
        if size > limits.max_tool_schema_bytes:
            raise BadRequest(
                f"a tool's parameters schema is at most {limits.max_tool_schema_bytes} bytes; this one has {size}",
                param=f"tools[{i}].function.parameters",
            )
