"""BFCL questions as OpenAI chat requests, for benchmarks (the evaluation harness has the full scorer)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

_TYPES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "integer": "integer"}


def json_schema(node: Any) -> Any:
    """BFCL's parameter docs (`"type": "dict"`, `"float"`, `"tuple"`, `"any"`) as JSON Schema."""
    if isinstance(node, dict):
        out = {k: json_schema(v) for k, v in node.items()}
        if node.get("type") == "any":
            del out["type"]
        elif isinstance(node.get("type"), str):
            out["type"] = _TYPES.get(node["type"], node["type"])
        return out
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    return node


def load(category: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` questions of a BFCL v4 category as {"id", "messages", "tools"}."""
    path = files("bfcl_eval") / "data" / f"BFCL_v4_{category}.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
    return [
        {
            "id": row["id"],
            "messages": row["question"][0],
            "tools": [{"type": "function", "function": json_schema(f)} for f in row["function"]],
        }
        for row in rows
    ]
