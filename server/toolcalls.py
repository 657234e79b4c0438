"""Text <-> tool calls for LLM output, in the pythonic (ToolACE-R) and hermes (Qwen/Hermes) formats.

Small models stray from the format they were asked for, so parsing is lenient where intent is unambiguous:
JSON call objects (`{"name": ..., "arguments": ...}`), one call per line, and a fenced code block holding nothing
but calls inside prose (the prose becomes `content`).
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import secrets
import string
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]  # JSON-compatible values


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None  # text that is not a tool call, stripped; None when empty
    tool_calls: tuple[ToolCall, ...]  # empty when the answer is plain text


class _NotToolCall(Exception):
    """Internal signal: the text does not have the shape of a tool call."""


# Everything a hostile or truncated input can make the parsers raise; parse_answer must never raise.
_PARSE_ERRORS = (_NotToolCall, SyntaxError, ValueError, TypeError, RecursionError, MemoryError, OverflowError)

_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"
_JSON_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")
# The language tag must be followed by a newline, so that "```f(a=1)```" keeps its "f".
_FENCE = re.compile(r"\A```(?:[\w+-]*[ \t]*\n)?(.*?)```\Z", re.DOTALL)
_FENCED_BLOCK = re.compile(r"```(?:[\w+-]*[ \t]*\n)?(.*?)```", re.DOTALL)
_JSON_NAMES = {"true": True, "false": False, "null": None}
_ID_CHARS = string.ascii_letters + string.digits


def parse_answer(text: str) -> ParsedAnswer:
    if _HERMES_OPEN in text:
        try:
            return _parse_hermes(text)
        except _PARSE_ERRORS:
            pass  # e.g. the tag only appears inside a pythonic string argument
    if calls := _calls_or_nothing(text):
        return ParsedAnswer(content=None, tool_calls=calls)
    if "```" in text:
        for block in _FENCED_BLOCK.finditer(text):
            if calls := _calls_or_nothing(block.group(1)):
                prose = (text[: block.start()] + text[block.end() :]).strip()
                return ParsedAnswer(content=prose or None, tool_calls=calls)
    return ParsedAnswer(content=text.strip() or None, tool_calls=())


def looks_like_call(text: str) -> bool:
    """Whether the text starts the way a tool call does, so a failure to parse it is worth counting."""
    body = text.lstrip()
    return body.startswith(("[", "{", _HERMES_OPEN, "```")) or _HERMES_OPEN in body


def _calls_or_nothing(text: str) -> tuple[ToolCall, ...]:
    """The calls `text` consists of, in the pythonic or the JSON form; () when it is anything else."""
    body = text.strip()
    if fence := _FENCE.match(body):
        body = fence.group(1).strip()
    try:
        if body.startswith(("{", "[{")):
            return _parse_json_calls(body)
        return _parse_pythonic(body)
    except _PARSE_ERRORS:
        return ()


def _parse_json_calls(body: str) -> tuple[ToolCall, ...]:
    """One JSON call object, a list of them, or several objects one after another separated by whitespace (how a
    model writes parallel calls when the tags around each `<tool_call>` block are lost: special tokens are not text)."""
    if body.startswith("["):  # a JSON text that starts with "[" is a list (or raises)
        return tuple(_hermes_call(item) for item in json.loads(body))
    calls, pos = [], 0
    while pos < len(body):
        obj, end = _JSON_DECODER.raw_decode(body, pos)  # ValueError on anything but a JSON value here
        calls.append(_hermes_call(obj))
        pos = _skip_ws(body, end)
    return tuple(calls)


def _skip_ws(text: str, pos: int) -> int:
    """Where the whitespace at `pos` ends."""
    match = _WS.match(text, pos)
    assert match is not None  # `\s*` matches everywhere, if only the empty string
    return match.end()


def _parse_hermes(text: str) -> ParsedAnswer:
    # Scan with raw_decode rather than a regex, so argument strings may contain the tags themselves.
    pieces: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(_HERMES_OPEN, pos)) != -1:
        pieces.append(text[pos:start])
        begin = _skip_ws(text, start + len(_HERMES_OPEN))
        obj, end = _JSON_DECODER.raw_decode(text, begin)  # ValueError on broken or cut-off JSON
        end = _skip_ws(text, end)
        if not text.startswith(_HERMES_CLOSE, end):
            raise _NotToolCall("unterminated <tool_call> block")
        calls.append(_hermes_call(obj))
        pos = end + len(_HERMES_CLOSE)
    pieces.append(text[pos:])
    return ParsedAnswer(content="".join(pieces).strip() or None, tool_calls=tuple(calls))


def _hermes_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise _NotToolCall("tool call is not a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _NotToolCall("tool call has no name")
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        args = {}
    elif isinstance(args, str):  # some models JSON-encode the arguments a second time
        args = json.loads(args)
    if not isinstance(args, dict):
        raise _NotToolCall("tool call arguments are not an object")
    return ToolCall(name=name, arguments=args)


def _parse_pythonic(body: str) -> tuple[ToolCall, ...]:
    if not body.endswith((")", "]")):  # cheap rejection of prose before running the parser
        return ()
    with warnings.catch_warnings():
        # Invalid escapes such as "\d" only warn; the warning must not turn into an error under -W error.
        warnings.simplefilter("ignore")
        try:
            nodes = [ast.parse(body, mode="eval").body]
        except SyntaxError:
            # one call per line: every statement must be a bare expression (a call or a list of calls)
            statements = ast.parse(body, mode="exec").body
            expressions = [s for s in statements if isinstance(s, ast.Expr)]
            if len(expressions) != len(statements):
                raise _NotToolCall("not only calls") from None
            nodes = [s.value for s in expressions]
    calls: list[ToolCall] = []
    for node in nodes:
        calls.extend(_pythonic_call(n) for n in (node.elts if isinstance(node, ast.List) else [node]))
    return tuple(calls)


def _pythonic_call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or node.args:
        raise _NotToolCall("not a call with keyword arguments only")
    arguments: dict[str, Any] = {}
    for kw in node.keywords:
        # "**{...}" is how render_pythonic spells keys that are not identifiers (e.g. "from", "my-key").
        items = {kw.arg: _literal(kw.value)} if kw.arg is not None else _literal(kw.value)
        if not isinstance(items, dict) or any(key in arguments for key in items):
            raise _NotToolCall("repeated or non-literal keyword argument")
        arguments.update(items)
    return ToolCall(name=_dotted_name(node.func), arguments=arguments)


def _dotted_name(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):  # iterative: attribute chains can be very long
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise _NotToolCall("function name is not a dotted name")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        number = node.operand.value if isinstance(node.operand, ast.Constant) else None
        # an int or float, not a bool (ast.parse makes no other subclass of either)
        if isinstance(number, int | float) and not isinstance(number, bool):
            return -number if isinstance(node.op, ast.USub) else number
    elif isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(elt) for elt in node.elts]
    elif isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _NotToolCall("dict keys must be strings")
            result[key.value] = _literal(value)
        return result
    elif isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotToolCall("argument value is not a literal")


def render_pythonic(calls: Sequence[ToolCall]) -> str:
    return "[" + ", ".join(_render_call(call) for call in calls) + "]"


def _render_call(call: ToolCall) -> str:
    if not all(_is_plain_identifier(part) for part in call.name.split(".")):
        raise ValueError(f"tool name {call.name!r} cannot be written as a pythonic call")
    args = [
        f"{key}={_render_value(value)}" if _is_plain_identifier(key) else f"**{{{key!r}: {_render_value(value)}}}"
        for key, value in call.arguments.items()
    ]
    return f"{call.name}({', '.join(args)})"


def _is_plain_identifier(name: str) -> bool:
    # Python NFKC-normalises identifiers, so only already-normalised ones survive a round trip.
    return name.isidentifier() and not keyword.iskeyword(name) and unicodedata.normalize("NFKC", name) == name


def _render_value(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise ValueError("dict keys in tool arguments must be strings")
        return "{" + ", ".join(f"{key!r}: {_render_value(item)}" for key, item in value.items()) + "}"
    raise ValueError(f"tool argument of type {type(value).__name__} is not JSON-compatible")


def render_hermes(calls: Sequence[ToolCall]) -> str:
    return "\n".join(
        f"{_HERMES_OPEN}\n"
        + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        + f"\n{_HERMES_CLOSE}"
        for call in calls
    )


def render_fenced_json(calls: Sequence[ToolCall]) -> str:
    """Calls as JSON objects in one fenced block, one object after another: how Qwen2.5-Coder writes a call in its
    native format when left to itself (it never writes the `<tool_call>` tags), and what `parse_answer` reads back."""
    objects = (json.dumps({"name": c.name, "arguments": c.arguments}, indent=2, ensure_ascii=False) for c in calls)
    return "```json\n" + "\n".join(objects) + "\n```"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(answer: ParsedAnswer | str) -> str:
    if isinstance(answer, str):
        answer = parse_answer(answer)
    if answer.tool_calls:
        return _canonical_json([[call.name, call.arguments] for call in answer.tool_calls])
    return " ".join((answer.content or "").split())


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def to_openai(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        for call in calls
    ]


def from_openai(tool_calls: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    result = []
    for index, item in enumerate(tool_calls):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"tool_calls[{index}].function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool_calls[{index}].function.name must be a non-empty string")
        arguments = function.get("arguments")
        if arguments is None or isinstance(arguments, str) and not arguments.strip():
            arguments = {}  # clients send "" (or nothing) for calls without parameters
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"tool_calls[{index}].function.arguments is not valid JSON: {exc}") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"tool_calls[{index}].function.arguments must be a JSON object")
        result.append(ToolCall(name=name, arguments=dict(arguments)))
    return result
