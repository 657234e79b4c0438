"""PrefixCache bookkeeping: longest prefix wins, LRU eviction by tokens, isolation by adapter and salt."""

from __future__ import annotations

import torch

from server.engine.prefix_cache import PrefixCache, PrefixEntry, common_prefix


def entry(ids: list[int], adapter: str | None = None, salt: str | None = None) -> PrefixEntry:
    kv = torch.zeros((1, len(ids), 2))
    return PrefixEntry(torch.tensor(ids), ((kv, kv),), adapter, salt)


def test_common_prefix() -> None:
    assert common_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 2
    assert common_prefix(torch.tensor([7]), torch.tensor([1])) == 0
    assert common_prefix(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0


def test_longest_prefix_wins_and_is_isolated_by_adapter_and_salt() -> None:
    cache = PrefixCache(1000)
    cache.store(entry([1, 2, 3, 4]))
    cache.store(entry([1, 2, 9]))
    cache.store(entry([1, 2, 3, 4, 5, 6], adapter="a"))
    cache.store(entry([1, 2, 3, 4, 5, 6], salt="tenant-b"))
    found, length = cache.lookup(torch.tensor([1, 2, 3, 4, 5, 6, 7]), None)
    assert found is not None and length == 4 and found.token_ids.tolist() == [1, 2, 3, 4]
    assert cache.lookup(torch.tensor([1, 2, 3, 4, 5, 6, 7]), "a")[1] == 6
    assert cache.lookup(torch.tensor([1, 2, 3, 4, 5, 6, 7]), None, "tenant-b")[1] == 6
    assert cache.lookup(torch.tensor([1, 2, 3]), "other-adapter") == (None, 0)


def test_an_extended_entry_replaces_its_prefix() -> None:
    cache = PrefixCache(1000)
    cache.store(entry([1, 2, 3]))
    cache.store(entry([1, 2, 3, 4, 5]))
    assert len(cache) == 1 and cache.tokens == 5


def test_lru_eviction_by_token_budget() -> None:
    cache = PrefixCache(10)
    cache.store(entry([1, 1, 1, 1]))
    cache.store(entry([2, 2, 2, 2]))
    cache.lookup(torch.tensor([1, 1, 1, 1]), None)  # touch: [2...] is now the least recently used
    cache.store(entry([3, 3, 3, 3]))
    assert cache.tokens <= 10
    assert cache.lookup(torch.tensor([2, 2, 2, 2]), None) == (None, 0)
    assert cache.lookup(torch.tensor([1, 1, 1, 1]), None)[1] == 4
    cache.store(entry(list(range(11))))  # larger than the whole budget: not stored
    assert cache.lookup(torch.tensor(list(range(11))), None)[1] <= 1


def test_clear_adapter() -> None:
    cache = PrefixCache(100)
    cache.store(entry([1, 2], adapter="a"))
    cache.store(entry([1, 2]))
    cache.clear_adapter("a")
    assert cache.lookup(torch.tensor([1, 2]), "a") == (None, 0)
    assert cache.lookup(torch.tensor([1, 2]), None)[1] == 2
