"""Work over many samples that survives a crash: each finished record is appended to a JSONL file at once, and a
rerun skips the ids already there. Selection, refine checks and evaluation all run through it, and every JSONL file
of the project (BFCL's data and the evaluation's results included) is read by `read_jsonl`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def read_jsonl(path: Path | Traversable, *, missing_ok: bool = True) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file, in order; none when it does not exist (yet) and `missing_ok`. A line that does not
    parse (the torn last line of a killed writer) is skipped: the work it stood for is redone by the rerun."""
    try:
        handle = path.open("rb")  # bytes: only b"\n" ends a line, and a torn UTF-8 character spoils only its line
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                continue


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records already written, by id."""
    return {record["id"]: record for record in read_jsonl(path)}


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
