"""An LRU store of KV caches keyed by token ids, so a request that shares a prefix with an earlier one skips it.

Refinement makes this pay: round r+1's prompt is round r's prompt plus its answer plus the refine turn, so
each round only computes its new tokens. Entries are per adapter (an adapter changes every key and value) and per
cache salt (vLLM's `cache_salt`: requests with different salts never share entries).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [kv_heads, tokens, head_dim]


@dataclass(frozen=True)
class PrefixEntry:
    token_ids: torch.Tensor  # 1-D long
    layers: tuple[LayerKV, ...]
    adapter: str | None
    salt: str | None = None

    def __len__(self) -> int:
        return int(self.token_ids.numel())


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n


class PrefixCache:
    """Holds at most `max_tokens` tokens of KV; the least recently used entries go first."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next_key = 0
        self.tokens = 0
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, token_ids: torch.Tensor, adapter: str | None, salt: str | None = None
    ) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `token_ids`, and that prefix's length (0: no entry)."""
        best, best_len, best_key = None, 0, None
        for key, entry in self._entries.items():
            if (entry.adapter, entry.salt) != (adapter, salt):
                continue
            length = common_prefix(entry.token_ids, token_ids)
            if length > best_len:
                best, best_len, best_key = entry, length, key
        if best_key is not None:
            self._entries.move_to_end(best_key)
        return best, best_len

    def record_hit(self, tokens: int) -> None:
        self.hits += 1
        self.hit_tokens += tokens

    def store(self, entry: PrefixEntry) -> None:
        if len(entry) == 0 or len(entry) > self.max_tokens:
            return
        # An entry the new one extends (or equals) is dead weight: every lookup it answers, the new one answers.
        for key, old in list(self._entries.items()):
            if (old.adapter, old.salt) == (entry.adapter, entry.salt) and common_prefix(
                old.token_ids, entry.token_ids
            ) == len(old):
                self._drop(key)
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.tokens += len(entry)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def clear_adapter(self, adapter: str) -> None:
        """Forget an adapter's entries (it was unloaded or replaced by new weights)."""
        for key, entry in list(self._entries.items()):
            if entry.adapter == adapter:
                self._drop(key)

    def _drop(self, key: int) -> None:
        self.tokens -= len(self._entries.pop(key))
