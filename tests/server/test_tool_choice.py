"""tool_choice → the JSON schema decoding is constrained to (pure logic; the real decoding is in test_openai_compat)."""

from __future__ import annotations

from server.tool_choice import closed, constraint_schema, json_schema

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
