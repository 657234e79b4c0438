"""tool_choice → the JSON schema decoding is constrained to (pure logic; the real decoding is in test_openai_compat).

Strings are fed to llguidance matchers over a byte-level tokenizer: what a grammar allows, without a model."""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import pytest
from llguidance._tokenizer import TokenizerWrapper
from pydantic import BaseModel

from server.engine.constrained import GRAMMAR_DEFAULTS, grammar_error, schema_error
from server.tool_choice import call_schema, closed, constraint_schema, has_local_refs, json_schema, rebase_refs
from server.tool_grammar import tool_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}


def test_free_choices_have_no_schema() -> None:
    assert constraint_schema([WEATHER], "auto") is None
    assert constraint_schema([WEATHER], None) is None
    assert constraint_schema([WEATHER], "none") is None


def test_named_choice_is_one_call_of_that_tool() -> None:
    schema = constraint_schema([WEATHER, CLOCK], {"type": "function", "function": {"name": "now"}})
    assert schema is not None
    assert schema["properties"]["name"] == {"type": "string", "enum": ["now"]}
    assert schema["properties"]["arguments"]["type"] == "object"  # a tool without parameters takes an empty object
    assert schema["additionalProperties"] is False


def test_required_is_a_non_empty_array_of_any_tool_or_one_call_without_parallel_calls() -> None:
    schema = constraint_schema([WEATHER, CLOCK], "required")
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1
    names = [option["properties"]["name"]["enum"] for option in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["now"]]
    single = constraint_schema([WEATHER], "required", parallel_tool_calls=False)
    assert single is not None and single["type"] == "object"


def test_python_type_names_become_json_schema() -> None:
    schema = json_schema({"type": "dict", "properties": {"x": {"type": "float"}, "y": {"type": "any"}}})
    assert schema == {"type": "object", "properties": {"x": {"type": "number"}, "y": {}}}


def test_closed_objects_but_not_properties_maps() -> None:
    schema = closed(
        {
            "type": "object",
            "properties": {
                "properties": {"type": "string"},  # a parameter that happens to be called "properties"
                "point": {"type": "object", "properties": {"x": {"type": "number"}}},
                "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
                "free": {"type": "object", "properties": {}, "additionalProperties": True},
            },
        }
    )
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    assert props["properties"] == {"type": "string"}
    assert props["point"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["free"]["additionalProperties"] is True  # an explicit choice is kept


# ---- schemas with $defs and $ref (pydantic's output for nested models) ----
# call_schema nests a tool's parameters under `arguments`: pointers such as `#/$defs/Node` must still resolve there.


def pydantic_tool(name: str = "plant_tree") -> dict[str, Any]:
    """A tool whose parameters pydantic wrote: a recursive model, so `$defs` and `$ref` (also to itself)."""

    class Node(BaseModel):
        label: str
        children: list[Node] = []

    class Tree(BaseModel):
        root: Node
        note: str | None = None

    return {"type": "function", "function": {"name": name, "parameters": Tree.model_json_schema()}}


SELF_REFERENCE = {  # `#` is the parameters object itself: a list of the same arguments
    "type": "function",
    "function": {
        "name": "nest",
        "parameters": {"type": "object", "properties": {"inner": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}},
    },
}


def test_pydantic_schema_has_defs_and_refs() -> None:
    parameters = pydantic_tool()["function"]["parameters"]
    assert "$defs" in parameters and parameters["properties"]["root"] == {"$ref": "#/$defs/Node"}


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_refs_resolve_under_required_and_named(choice: str, parallel: bool) -> None:
    tools = [WEATHER, pydantic_tool(), SELF_REFERENCE, pydantic_tool("plant_other")]
    named = {"type": "function", "function": {"name": "plant_tree"}}
    schema = constraint_schema(tools, named if choice == "named" else choice, parallel)
    assert schema is not None
    assert schema_error(schema) == ""
    # The same answer as before the move: a call following the pydantic model, and none breaking it.
    grammar = schema_grammar(schema)
    call = {"name": "plant_tree", "arguments": {"root": {"label": "a", "children": [{"label": "b", "children": []}]}}}
    text = json.dumps(call, separators=(",", ":"))
    if choice == "required" and parallel:
        text = f"[{text}]"
    assert accepted(grammar, text)
    assert not accepted(grammar, text.replace('"label":"b"', '"name":"b"'))


@pytest.mark.parametrize("parallel", [True, False])
def test_refs_resolve_under_auto(parallel: bool) -> None:
    grammar = tool_grammar([WEATHER, pydantic_tool(), SELF_REFERENCE], parallel=parallel)
    assert grammar_error(grammar) == ""
    tree = "plant_tree(root={'label': 'a', 'children': [{'label': 'b', 'children': []}]})"
    assert accepted(grammar, f"[{tree}]")
    assert accepted(grammar, '{"name": "plant_tree", "arguments": {"root": {"label": "a"}, "note": null}}')
    assert accepted(grammar, "[nest(inner={'inner': None})]")
    assert not accepted(grammar, f"[{tree.replace('label', 'name')}]")
    assert not accepted(grammar, '{"name": "plant_tree", "arguments": {"root": {"label": 1}}}')


def test_refs_are_rebased_with_the_schema() -> None:
    schema = call_schema(pydantic_tool()["function"])
    assert schema["properties"]["arguments"] == {"$ref": "#/$defs/arguments"}
    moved = schema["$defs"]["arguments"]
    assert moved["properties"]["root"] == {"$ref": "#/$defs/arguments/$defs/Node"}
    assert not has_local_refs(call_schema(WEATHER["function"]))  # a schema without refs stays where it was
    rebased = rebase_refs({"enum": [{"$ref": "#"}], "items": {"$ref": "#"}}, "/x")
    assert rebased == {"enum": [{"$ref": "#"}], "items": {"$ref": "#/x"}}  # data is never rewritten


class _Bytes:
    """A tokenizer whose tokens are the 256 bytes, plus an end-of-sequence token."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff[EOS]"]
    special_token_ids = [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


@functools.cache
def byte_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(TokenizerWrapper(_Bytes()))


def schema_grammar(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=GRAMMAR_DEFAULTS)


def accepted(grammar: str, text: str) -> bool:
    """Whether `text` is a whole answer under `grammar` (a JSON-schema grammar, or Lark)."""
    if not grammar.lstrip().startswith("{"):
        grammar = llguidance.LLMatcher.grammar_from_lark(grammar)
    tokenizer = byte_tokenizer()
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.tokenize_str(text)
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and matcher.is_accepting()
