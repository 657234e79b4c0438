"""tool_choice and parallel_tool_calls as a JSON schema the engine decodes under (constrained decoding).

`required` and the named form must produce a call even from a model that would rather chat, with arguments that
conform to the tool's schema; retrying until the model complies is neither bounded nor exact, a grammar is both.
The schema describes JSON call objects `{"name": ..., "arguments": {...}}`, which the tool-call parser reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# BFCL (and some other tool catalogs) spell JSON Schema types the Python way.
_TYPE_ALIASES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "int": "integer"}


def json_schema(node: Any) -> Any:
    """A tool's parameter schema with Python-style type names (`dict`, `float`, `tuple`, `any`) made JSON Schema."""
    if isinstance(node, Mapping):
        out = {key: json_schema(value) for key, value in node.items()}
        kind = node.get("type")
        if kind == "any":
            del out["type"]
        elif isinstance(kind, str):
            out["type"] = _TYPE_ALIASES.get(kind, kind)
        return out
    if isinstance(node, list):
        return [json_schema(value) for value in node]
    return node


def closed(schema: Any) -> Any:
    """Objects with declared properties get `additionalProperties: false` unless they say otherwise, as OpenAI's
    strict mode does: an open object lets a small model pad the arguments with keys no tool takes. Walks the
    schema's structure (properties, items, combinators, definitions), never a properties map as if it were one."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), Mapping):
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), Mapping):
            out[key] = closed(out[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    return out


def call_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    parameters = closed(json_schema(function.get("parameters") or {"type": "object", "properties": {}}))
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def constraint_schema(
    tools: Sequence[Mapping[str, Any]], tool_choice: Any, parallel_tool_calls: bool = True
) -> dict[str, Any] | None:
    """The schema an answer must follow for this tool_choice; None when decoding is free (`auto`, `none`)."""
    functions = [tool["function"] for tool in tools]
    if isinstance(tool_choice, Mapping):  # {"type": "function", "function": {"name": ...}}: exactly that tool, once
        name = tool_choice["function"]["name"]
        return call_schema(next(f for f in functions if f["name"] == name))
    if tool_choice != "required":
        return None
    calls = [call_schema(f) for f in functions]
    one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not parallel_tool_calls:
        return one_call
    return {"type": "array", "items": one_call, "minItems": 1}
