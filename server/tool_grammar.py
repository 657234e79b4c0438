"""The lazy tool-call grammar of tool_choice "auto": text stays free until the answer starts a call.

Under `auto` the model may answer in words, decline, or call tools. This grammar (Lark, compiled by llguidance)
leaves words alone and takes over once the answer takes a shape the tool-call parser (server/toolcalls.py) would
read as a call: from there on, a function name among the offered ones, its declared parameters only (in the
declared order, as llguidance's JSON objects), every required one, values of the schema's types and enums.

The triggers are every way the parser reads a call. It reads all of them in either prompt format, so the grammar of
either format has all of them: a form left out would let a malformed call through, since the server would still
parse and return it. The prompt format decides which form a model writes; the others are guards.
- The answer opens with `[`, `{` or an offered function's `name(`: the answer is calls, nothing follows them.
  `[name(param=value, ...), ...]` (the pythonic format), bare `name(...)` calls one per line, a JSON call object
  `{"name": ..., "arguments": {...}}`, several one per line, or a list of them. Free text may not open like that
  (after blanks, comments, parentheses: what Python skips), so it cannot slip a call past the grammar; `print(x)`
  or `(note)` stay free.
- `<tool_call>` anywhere (typed out, or the tokenizer's own token, as Qwen's): a hermes block
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the native format), then free text again.
- Three backticks anywhere: a fenced block of calls (```` ```json\n{"name": ...}\n``` ```` as the embedded Qwen
  writes in the native format, or pythonic calls), or a code block that does not start like a call.

Laziness is llguidance's lazy lexeme: the text before a trigger is one lexeme that ends at the trigger's first
occurrence, after which the grammar allows only what follows the trigger (llama.cpp's "lazy grammar", llguidance's
`StructTag`). The price: prose that opens like a call (`[1] ...`, `{...}`, `get_weather (` for an offered
get_weather) or a code block that does (```` ```json\n{ ```` holding data) is committed to a call, so it must take
another shape. llguidance's lexer does not go back, so a bare call comes without whitespace before it.

Values in pythonic calls are Python literals (strings in either quote, `True`/`False`/`None` or their JSON
spellings) for the JSON Schema subset tool schemas use: `type` (one or a list), `enum`, `const`, `anyOf`/`oneOf`,
`$ref` into the schema, `items`/`minItems`/`maxItems`, `properties`/`required`/`additionalProperties`. A parameter
whose schema uses anything else (`pattern`, `minimum`, `format`, `allOf`...) takes a JSON value instead, which is
a Python literal too, checked by llguidance's JSON Schema compiler as the JSON forms are. `parallel_tool_calls:
false` allows one call in every form, and the answer ends after it.

Known gaps, all in string arguments: one holding a whole `<tool_call>{...}</tool_call>` block is read by the parser
as that inner call; three backticks in one inside a fenced block end the block early for the parser (the call then
comes back as text). A function name spelled in characters Python folds to ASCII (full-width letters) is not
guarded at the start of free text.
"""

from __future__ import annotations

import itertools
import json
import keyword
import math
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from server.tool_choice import any_call_schema, closed, has_local_refs, json_schema, rebase_refs

# JSON inside calls, in the layouts models write them: compact with json.dumps' separators (Qwen's `tojson`, the
# hermes blocks) and indented (`json.dumps(indent=2)`: the fenced block the native format's targets and the embedded
# Qwen write). Forcing one layout on a model trained on the other pushes it off its own distribution (it moved
# answers on BFCL multiple both ways). The pattern bounds a run of whitespace to one line break and an indent where
# llguidance reads it as one run (1.9); 1.7, which vLLM pins, lets runs follow each other. Lenient as for required.
JSON_STYLE = {
    "whitespace_flexible": True,
    "whitespace_pattern": r"\n? {0,24}",
    "item_separator": ",",
    "key_separator": ":",
    "lenient": True,
}

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"

# ---- regular expressions (llguidance's syntax: Rust regex plus `&` and `~` on terminals) ----
_SP = r"([ \t]|\\\n)"  # where Python allows space in a dotted name or before `(`: blanks, line continuations
# What may come before the first statement Python reads: blanks, comments, line continuations, parentheses.
_PREFIX = r"(\s|#[^\n]*|\\\n|\()*"
_FENCE_LANGUAGE = r"[\w+-]*[ \t]*\n"  # the parser's optional language line after the opening backticks


def _call_start(names: Sequence[str]) -> str:
    """Text the parser may read as calls: `[` or `{` (a list of calls, a JSON call), or an offered function's name
    and its parenthesis, after what Python skips. A call to another name comes back as text, so `print(x)` stays
    free (and no grammar alternative starts with `(`: it is only passed over)."""
    calls = [rf"{_SP}*\.{_SP}*".join(part for part in name.split(".")) for name in names]
    named = rf"({'|'.join(calls)}){_SP}*\(" if calls else ""
    return rf"{_PREFIX}([\[{{]{'|' + named if named else ''})(.|\n)*"


_PY_ESCAPE = r"\\([\n\\'\"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u([0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})|U(000[0-9a-fA-F]{5}|0010[0-9a-fA-F]{4}))"  # noqa: E501


def _text_rules(call_start: str) -> str:
    """Free text and code: nothing the parser reads as a call at the start, no `<tool_call>` in code."""
    return rf"""
TEXT: /(.|\n)*/
HEAD: /(.|\n)*/ & ~/{call_start}/
FENCE_CODE: /(.|\n)*```/ & ~/{_FENCE_LANGUAGE}(.|\n)*/ & ~/{call_start}/ & ~/(.|\n)*<tool_call>(.|\n)*/
FENCE_LANGUAGE_CODE: /(.|\n)*```/ & ~/{call_start}/ & ~/(.|\n)*<tool_call>(.|\n)*/
"""


_COMMON_RULES = rf"""
LEAD_WS: /\s+/
FENCE_LANGUAGE: /{_FENCE_LANGUAGE}/
FENCE_END: /\s*```/
head_hermes[lazy]: HEAD "<tool_call>"
head_fence[lazy]: HEAD "```"
text_hermes[lazy]: TEXT "<tool_call>"
text_fence[lazy]: TEXT "```"
fence_code[lazy]: FENCE_CODE
fence_language_code[lazy]: FENCE_LANGUAGE_CODE
COMMA: /, ?/
COLON: /: ?/
PY_STR: /"([^"\\\n\r\x00]|{_PY_ESCAPE})*"/ | /'([^'\\\n\r\x00]|{_PY_ESCAPE})*'/
PY_INT: /-?(0|[1-9][0-9]*)/
PY_NUM: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
PY_NAME: /[A-Za-z_][A-Za-z0-9_]*/
py_bool: "True" | "False" | "true" | "false"
py_none: "None" | "null"
py_any: PY_STR | PY_NUM | py_bool | py_none | "[" (py_any (COMMA py_any)*)? "]"
      | "{{" (PY_STR COLON py_any (COMMA PY_STR COLON py_any)*)? "}}"
"""

# Keywords that say nothing about which values are valid.
_ANNOTATIONS = frozenset(
    {"description", "title", "default", "examples", "example", "$comment", "deprecated", "readOnly", "writeOnly"}
    | {"$schema", "$id", "$anchor", "x-guidance", "optional"}  # BFCL marks optional parameters "optional"
)
_DEFINITIONS = frozenset({"$defs", "definitions"})
_TYPE_KEYWORDS = {
    "string": frozenset(),
    "integer": frozenset(),
    "number": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
}


def tool_grammar(
    tools: Sequence[Mapping[str, Any]], *, parallel: bool = True, special_tokens: Collection[str] = ()
) -> str:
    """The Lark grammar of an `auto` answer for these OpenAI tools. `special_tokens` are the tokenizer's added
    tokens: `<tool_call>` / `</tool_call>` among them are also accepted as those tokens (llguidance matches a
    special token only where the grammar names it)."""
    functions = [tool["function"] for tool in tools]
    if not functions:
        raise ValueError("no tools to call")
    rules = _Rules()
    pythonic = [c for f in functions if (c := _PythonicCall(rules, f).expression()) is not None]
    rules.add("json_call", "%json " + json.dumps({**any_call_schema(functions), "x-guidance": JSON_STYLE}))
    if pythonic:
        rules.add("py_call", " | ".join(pythonic))
    # Calls, as a whole answer or a fenced block. llguidance's lexer does not go back: a lexeme that stays possible
    # (free text) hides one that ended before it (whitespace), so a bare `name(...)` comes without whitespace
    # before it, while `[` and `{` end free text at once.
    if parallel:
        # JSON call objects one after another on their own lines, as the native format's targets write several
        spaced = ['json_call ("\\n" json_call)*', '"[" json_call (COMMA json_call)* "]"']
        spaced += ['"[" py_call (COMMA py_call)* "]"'] if pythonic else []
        bare = ['py_call ("\\n" py_call)*'] if pythonic else []
    else:
        spaced = ["json_call", '"[" json_call "]"'] + (['"[" py_call "]"'] if pythonic else [])
        bare = ["py_call"] if pythonic else []
    rules.add("calls", " | ".join([f"LEAD_WS? ({' | '.join(spaced)})", *bare]))
    rules.add("fence_calls", "FENCE_LANGUAGE? calls FENCE_END")
    rules.add("code", "fence_code | FENCE_LANGUAGE fence_language_code")
    close = '"</tool_call>"' + (" | </tool_call>" if HERMES_CLOSE in special_tokens else "")
    rules.add("hermes", f'"\\n"? json_call "\\n"? ({close})')
    # Free text up to a trigger: HEAD at the start of the answer (it may not start like a call), TEXT later on.
    special = HERMES_OPEN in special_tokens
    for text in ("head", "text"):
        alternatives = [f"{text}_hermes hermes", f"{text}_fence fence_calls"]
        alternatives += [f"{text.upper()} <tool_call> hermes"] if special else []
        rules.add(f"{text}_call", " | ".join(alternatives))
    if parallel:  # any number of calls and code blocks, text between and after them
        rules.add("block", "text_call | text_fence code")
        rules.add("prose", "HEAD | (head_call | head_fence code) block* TEXT")
    else:  # code blocks, then text or one call that ends the answer
        rules.add("prose", "HEAD | head_fence code (text_fence code)* (TEXT | text_call) | head_call")
    names = [f["name"] for f in functions if _python_name(f["name"])]
    return "%llguidance {}\nstart: calls | prose\n" + rules.text() + _text_rules(_call_start(names)) + _COMMON_RULES


class _Unsupported(Exception):
    """A schema keyword the Python-literal rules do not cover: the value is then a JSON one (`%json`)."""


class _Rules:
    """Named Lark rules, in order, with fresh names on demand."""

    def __init__(self) -> None:
        self.rules: list[tuple[str, str]] = []
        self._numbers = itertools.count()

    def add(self, name: str, body: str) -> str:
        self.rules.append((name, body))
        return name

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self._numbers)}"

    def text(self) -> str:
        return "".join(f"{name}: {body}\n" for name, body in self.rules)


class _PythonicCall:
    """The rules of one function's pythonic call `name(param=value, ...)`, values as Python literals."""

    def __init__(self, rules: _Rules, function: Mapping[str, Any]) -> None:
        self.rules = rules
        self.function = function
        self.root = closed(json_schema(function.get("parameters") or {"type": "object", "properties": {}}))
        self.refs: dict[str, str] = {}  # JSON pointer into root -> its rule

    def expression(self) -> str | None:
        """The call's Lark expression; None when the name is no Python name or the top-level parameters schema
        is beyond the pythonic rules (the call is then made in a JSON form only)."""
        name = self.function["name"]
        if not _python_name(name):
            return None
        saved = len(self.rules.rules)
        try:
            pointer, parameters = self._resolve_top(self.root, "")
            arguments = self._arguments(parameters, pointer)
        except _Unsupported:
            del self.rules.rules[saved:]
            return None
        return self.rules.add(self.rules.fresh("call"), f'"{name}(" {arguments} ")"')

    def _resolve_top(self, schema: Any, pointer: str) -> tuple[str, Mapping[str, Any]]:
        for _ in range(32):
            if not isinstance(schema, Mapping) or set(schema) - _ANNOTATIONS - _DEFINITIONS != {"$ref"}:
                break
            pointer = _local_pointer(schema["$ref"])
            schema = _resolve(self.root, pointer)
        if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
            raise _Unsupported
        if set(schema) - _ANNOTATIONS - _DEFINITIONS - _TYPE_KEYWORDS["object"] - {"type"}:
            raise _Unsupported
        return pointer, schema

    def _arguments(self, schema: Mapping[str, Any], pointer: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise _Unsupported
        if any(name not in properties for name in required):
            raise _Unsupported  # a required parameter without a declaration: the JSON forms tell
        if not properties:
            if extra is False:
                return ""
            value = self._parameter(extra if isinstance(extra, Mapping) else True, pointer + "/additionalProperties")
            entry = f'PY_NAME "=" {value}'
            return f"({entry} (COMMA {entry})*)?"
        # Declared parameters only (an explicit additionalProperties still gets no undeclared keyword here).
        entries = []
        for name, sub in properties.items():
            value = self._parameter(sub, f"{pointer}/properties/{_escape(name)}")
            if _keyword_argument(name):
                entries.append((f'"{name}=" {value}', name in required))
            else:  # how render_pythonic spells a key that is no Python name: **{"from": 1}
                entries.append((f'"**{{" {_key(name)} COLON {value} "}}"', name in required))
        return self._chain(entries)

    def _parameter(self, schema: Any, pointer: str) -> str:
        """One parameter's value: Python-literal rules, or a JSON value when its schema goes beyond them."""
        saved_rules, saved_refs = len(self.rules.rules), dict(self.refs)
        try:
            return self._value(schema)
        except _Unsupported:
            del self.rules.rules[saved_rules:]
            self.refs = saved_refs
            return self.rules.add(self.rules.fresh("json"), self._json(schema, pointer))

    def _json(self, schema: Any, pointer: str) -> str:
        if has_local_refs(self.root):
            document = {"$defs": {"p": rebase_refs(self.root, "/$defs/p")}, "$ref": "#/$defs/p" + pointer}
        else:
            document = dict(schema) if isinstance(schema, Mapping) else {} if schema is True else {"not": {}}
        return "%json " + json.dumps({**document, "x-guidance": JSON_STYLE})

    def _value(self, schema: Any) -> str:
        if schema is True:
            return "py_any"
        if not isinstance(schema, Mapping):
            raise _Unsupported
        keys = set(schema) - _ANNOTATIONS - _DEFINITIONS
        if "$ref" in keys:
            if keys != {"$ref"}:
                raise _Unsupported
            return self._ref(schema["$ref"])
        if "const" in keys or "enum" in keys:
            return self._choice(schema, keys)
        combinator = keys & {"anyOf", "oneOf"}
        if combinator:
            options = schema[combinator.pop()]
            if keys != {"anyOf"} and keys != {"oneOf"} or not isinstance(options, list) or not options:
                raise _Unsupported
            return _alternatives(self._value(option) for option in options)
        if "type" not in keys:
            if keys:
                raise _Unsupported
            return "py_any"
        types = schema["type"]
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in _TYPE_KEYWORDS for t in types):
            raise _Unsupported  # an unknown type: llguidance's JSON compiler says what is wrong with it
        allowed = frozenset({"type"}).union(*(_TYPE_KEYWORDS[t] for t in types))
        if keys - allowed:
            raise _Unsupported
        return _alternatives(self._typed(t, schema) for t in dict.fromkeys(types))

    def _typed(self, kind: str, schema: Mapping[str, Any]) -> str:
        if kind == "array":
            items = schema.get("items", True)
            lo, hi = schema.get("minItems", 0), schema.get("maxItems")
            if not isinstance(items, Mapping | bool) or not _count(lo) or hi is not None and not _count(hi):
                raise _Unsupported
            return _sequence("[", self._value(items), "]", lo, hi)
        if kind == "object":
            return self._object(schema)
        return {"string": "PY_STR", "integer": "PY_INT", "number": "PY_NUM", "boolean": "py_bool"}.get(kind, "py_none")

    def _object(self, schema: Mapping[str, Any]) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise _Unsupported
        if properties and extra is not False or any(name not in properties for name in required):
            raise _Unsupported  # declared keys and others, or required undeclared keys: llguidance's JSON rules
        if not properties:
            if extra is False:
                return '"{" "}"'
            entry = f"PY_STR COLON {self._value(extra if isinstance(extra, Mapping) else True)}"
            return f'"{{" ({entry} (COMMA {entry})*)? "}}"'
        entries = [(f"{_key(name)} COLON {self._value(sub)}", name in required) for name, sub in properties.items()]
        return f'"{{" {self._chain(entries)} "}}"'

    def _choice(self, schema: Mapping[str, Any], keys: set[str]) -> str:
        if keys - {"const", "enum", "type"} or {"const", "enum"} <= keys:
            raise _Unsupported
        values = [schema["const"]] if "const" in keys else schema["enum"]
        if not isinstance(values, list):
            raise _Unsupported
        kinds = schema.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        values = [v for v in values if kinds is None or any(_is_of_type(v, kind) for kind in kinds)]
        literals = [literal for v in values for literal in _literals(v)]
        if not literals:
            raise _Unsupported  # no value: llguidance says why
        return _alternatives(json.dumps(literal) for literal in dict.fromkeys(literals))

    def _ref(self, ref: Any) -> str:
        pointer = _local_pointer(ref)
        if pointer not in self.refs:
            self.refs[pointer] = name = self.rules.fresh("ref")  # before the body: the definition may recurse
            self.rules.add(name, self._value(_resolve(self.root, pointer)))
        return self.refs[pointer]

    def _chain(self, entries: list[tuple[str, bool]]) -> str:
        """Entries in their order, each optional one present or not, every required one present, separated by
        commas: the alternatives are which entry comes first; after it, each remaining one with its comma."""
        tails = [""] * (len(entries) + 1)
        for i in reversed(range(1, len(entries))):
            expression, required = entries[i]
            piece = f"COMMA {expression}" if required else f"(COMMA {expression})?"
            tails[i] = self.rules.add(self.rules.fresh("rest"), f"{piece} {tails[i + 1]}".strip())
        firsts = []
        for i, (expression, required) in enumerate(entries):
            firsts.append(f"{expression} {tails[i + 1]}".strip())
            if required:
                return _alternatives(firsts)
        return _alternatives(firsts) + "?"


def _python_name(name: str) -> bool:
    """Whether Python reads `name(...)` as a call of that (dotted) name, as render_pythonic writes it."""
    return all(part.isidentifier() and part.isascii() and not keyword.iskeyword(part) for part in name.split("."))


def _keyword_argument(name: str) -> bool:
    """Whether `name=` reads back as that key (render_pythonic's rule: Python NFKC-folds identifiers)."""
    return name.isidentifier() and not keyword.iskeyword(name) and unicodedata.normalize("NFKC", name) == name


def _key(name: str) -> str:
    """A dict key (or `**{...}` keyword) as Lark: the string in either quote."""
    return _alternatives(map(json.dumps, _string_literals(name)))


def _alternatives(expressions: Any) -> str:
    return "(" + " | ".join(expressions) + ")"


def _sequence(open_: str, item: str, close: str, lo: int, hi: int | None) -> str:
    """`[item, item, ...]` with lo..hi items (hi None: no bound)."""
    if hi is not None and hi < lo:
        raise _Unsupported
    empty = f'"{open_}" "{close}"'
    if hi == 0:
        return empty
    more = f"(COMMA {item})"
    if hi is None:
        repeat = f"{more}*" if lo <= 1 else f"{more}{{{lo - 1},}}"
    else:
        repeat = f"{more}{{{max(lo - 1, 0)},{hi - 1}}}" if hi > 1 else ""
    items = f'"{open_}" {item} {repeat} "{close}"'
    return f"({items} | {empty})" if lo == 0 else items


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_of_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    checks: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "number": (int, float),
        "boolean": bool,
        "array": list,
        "object": dict,
    }
    if kind == "null":
        return value is None
    if kind not in checks:
        raise _Unsupported
    return isinstance(value, checks[kind]) and (kind == "boolean" or not isinstance(value, bool))


def _literals(value: Any) -> list[str]:
    """The ways a Python literal may spell a JSON value in a call: Python's repr and JSON's, where they differ."""
    if isinstance(value, bool):
        return ["True", "true"] if value else ["False", "false"]
    if value is None:
        return ["None", "null"]
    if isinstance(value, float) and not math.isfinite(value):
        return []
    if isinstance(value, str):
        return _string_literals(value)
    try:
        return list(dict.fromkeys([repr(value), json.dumps(value, ensure_ascii=False)]))
    except (TypeError, ValueError):
        return []


def _string_literals(text: str) -> list[str]:
    if any("\ud800" <= ch <= "\udfff" for ch in text):  # a lone surrogate has no UTF-8 spelling
        return []
    return list(dict.fromkeys([repr(text), json.dumps(text, ensure_ascii=False)]))


def _local_pointer(ref: Any) -> str:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _Unsupported  # a $ref out of the schema: llguidance's JSON compiler reports it
    return ref[1:]


def _resolve(root: Any, pointer: str) -> Any:
    node = root
    for part in pointer.split("/")[1:] if pointer else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _Unsupported  # a dangling $ref: llguidance's JSON compiler reports it
    return node


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
