"""Work over many samples that survives a crash: each finished record is appended to a JSONL file at once, and a
rerun skips the ids already there. Selection, refine checks and evaluation all run through it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records already written, by id. A line cut short by a crash is ignored (and redone)."""
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["id"]] = record
    return records


async def map_resumable(
    items: Sequence[T],
    key: Callable[[T], str],
    fn: Callable[[T], Awaitable[dict[str, Any]]],
    path: Path,
    *,
    concurrency: int,
    desc: str,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run `fn` over the items not yet in `path`, `concurrency` at a time; return every record by id, in item order."""
    done = read_records(path)
    todo = [item for item in items if key(item) not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress, dynamic_ncols=True)
    with path.open("a") as sink:

        async def run(item: T) -> None:
            async with semaphore:
                record = {"id": key(item), **await fn(item)}
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()  # one line per finished item: a crash loses at most the items in flight
            done[record["id"]] = record
            bar.update(1)

        try:
            await asyncio.gather(*(run(item) for item in todo))
        finally:
            bar.close()
    return {key(item): done[key(item)] for item in items}
