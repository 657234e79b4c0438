"""BFCL questions as OpenAI chat requests, for benchmarks (the evaluation harness has the full scorer)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from server.tool_choice import json_schema


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
