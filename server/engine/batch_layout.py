"""The KV-cache layout of a batch whose rows hold different amounts of cached context: right-aligned in one width,
with an attention mask that hides the left padding (and rejected draft positions)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from server.engine.prefix_cache import PrefixEntry


def batch_cache(reused: list[tuple[PrefixEntry | None, int]], width: int) -> DynamicCache:
    """A batch cache holding each row's reused prefix right-aligned in `width` slots (zeros before it)."""
    cache = DynamicCache()
    first = next((entry for entry, _ in reused if entry is not None), None)
    if first is None or width == 0:
        return cache
    for layer, (keys0, values0) in enumerate(first.layers):
        heads, _, dim = keys0.shape
        keys = keys0.new_zeros((len(reused), heads, width, dim))
        values = values0.new_zeros((len(reused), values0.shape[0], width, values0.shape[2]))
        for i, (entry, length) in enumerate(reused):
            if entry is not None:
                keys[i, :, width - length :] = entry.layers[layer][0][:, :length]
                values[i, :, width - length :] = entry.layers[layer][1][:, :length]
        cache.update(keys, values, layer)
    return cache


def stack(
    cache_a: DynamicCache, attention_a: torch.Tensor, cache_b: DynamicCache, attention_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """One batch of two: each cache right-aligned in the wider one's width, the gap masked out on the left."""
    width = max(attention_a.shape[1], attention_b.shape[1])

    def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = width - shape[dim]
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    cache = DynamicCache()
    for layer, (a, b) in enumerate(zip(cache_a.layers, cache_b.layers, strict=True)):
        (keys_a, values_a), (keys_b, values_b) = keys_values(a), keys_values(b)
        keys = torch.cat([left_pad(keys_a, 2), left_pad(keys_b, 2)])
        values = torch.cat([left_pad(values_a, 2), left_pad(values_b, 2)])
        cache.update(keys, values, layer)
    return cache, torch.cat([left_pad(attention_a, 1), left_pad(attention_b, 1)])


def keys_values(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values. Every layer of a filled DynamicCache over the models served here has both
    (no linear-attention layers)."""
    assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values
