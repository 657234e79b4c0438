"""The one JSONL reader: what a killed writer leaves behind is skipped, the rest read as written."""

from __future__ import annotations

import json

import pytest

from training.resumable import read_jsonl, read_records


def test_a_torn_last_line_is_skipped(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"id": "a", "text": "line\u2028separator"}, {"id": "b", "text": "é"}]
    torn = json.dumps({"id": "c", "text": "é"}, ensure_ascii=False).encode()[:-3]  # cut inside "é"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + b"\n" + torn)
    assert list(read_jsonl(path)) == rows
    assert read_records(path) == {"a": rows[0], "b": rows[1]}


def test_a_missing_file(tmp_path) -> None:
    assert list(read_jsonl(tmp_path / "none.jsonl")) == []
    assert read_records(tmp_path / "none.jsonl") == {}
    with pytest.raises(FileNotFoundError):
        list(read_jsonl(tmp_path / "none.jsonl", missing_ok=False))
