"""tool_choice and parallel_tool_calls as a JSON schema the engine decodes under (constrained decoding).

`required` and the named form must produce a call even from a model that would rather chat, with arguments that
conform to the tool's schema; retrying until the model complies is neither bounded nor exact, a grammar is both.
The schema describes JSON call objects `{"name": ..., "arguments": {...}}`, which the tool-call parser reads.
`auto` decodes under the lazy grammar of server/tool_grammar.py, built from the same call schemas.
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


# Keywords whose value is one subschema, a list of them, or a map of names to them: where a walk over a schema's
# structure goes (never into `enum`, `const`, `default` or `examples`, which hold data).
_SUBSCHEMA = (
    *("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else"),
    *("propertyNames", "unevaluatedItems", "unevaluatedProperties"),
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")


def _map_schema(schema: Any, fn: Any) -> Any:
    """`schema` with `fn` applied to every (sub)schema object, bottom up, following the structure only."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), Mapping):
            out[key] = _map_schema(out[key], fn)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_map_schema(sub, fn) for sub in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _map_schema(sub, fn) for name, sub in out[key].items()}
    return fn(out)


def has_local_refs(schema: Any) -> bool:
    """Whether the schema holds a `$ref` into itself (`#`, `#/$defs/...`, `#/properties/...`)."""
    found = False

    def visit(node: dict[str, Any]) -> dict[str, Any]:
        nonlocal found
        found = found or (isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"))
        return node

    _map_schema(schema, visit)
    return found


def rebase_refs(schema: Any, base: str) -> Any:
    """The schema with every local `$ref` pointing as before once the schema itself sits at JSON pointer `base` of
    a larger document: `#/$defs/n` becomes `#<base>/$defs/n`, `#` becomes `#<base>`."""

    def rebase(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node["$ref"] = "#" + base + ref[1:]
        return node

    return _map_schema(schema, rebase)


def call_schema(function: Mapping[str, Any], defs_key: str = "arguments") -> dict[str, Any]:
    """The JSON call object `{"name": ..., "arguments": {...}}` of one function. A parameters schema with `$ref`s
    into itself (pydantic's `$defs` for nested models, a recursive `#`) is not nested under `arguments` as it is:
    its pointers would then miss. It moves whole to the document's root, `$defs[defs_key]`, with every pointer
    rebased, and `arguments` refers to it there."""
    parameters = closed(json_schema(function.get("parameters") or {"type": "object", "properties": {}}))
    defs = None
    if has_local_refs(parameters):
        defs = {defs_key: rebase_refs(parameters, f"/$defs/{defs_key}")}
        parameters = {"$ref": f"#/$defs/{defs_key}"}
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def any_call_schema(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One call of any of the functions: their call schemas under `anyOf` (one alone as it is), every function's
    `$defs` gathered at the root (a pointer can only reach the document's root)."""
    calls = [call_schema(f, f"arguments{i}") for i, f in enumerate(functions)]
    defs = {key: value for call in calls for key, value in call.pop("$defs", {}).items()}
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if defs:
        schema["$defs"] = defs
    return schema


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
    one_call = any_call_schema(functions)
    if not parallel_tool_calls:
        return one_call
    schema = {"type": "array", "items": one_call, "minItems": 1}
    if "$defs" in one_call:
        schema["$defs"] = one_call.pop("$defs")
    return schema


def call_or_answer_schema(
    tools: Sequence[Mapping[str, Any]], parallel_tool_calls: bool, answer: Mapping[str, Any]
) -> dict[str, Any]:
    """tool_choice `auto` with a JSON response_format: the answer is either calls (as under `required`) or the JSON
    answer. The answer schema moves to `$defs.answer` (its pointers rebased) beside the calls' definitions."""
    calls = constraint_schema(tools, "required", parallel_tool_calls)
    assert calls is not None
    defs = {**calls.pop("$defs", {}), "answer": rebase_refs(dict(answer), "/$defs/answer")}
    return {"anyOf": [calls, {"$ref": "#/$defs/answer"}], "$defs": defs}
