"""Decode-step attention for grouped-query models that reads the KV cache as it is, without a copy per query head.

With an attention mask (and the batched engine always has one: left padding), transformers' SDPA path expands every
key/value head to its query heads (`repeat_kv`) before attending. For a one-token decode step that copy is most of
the work: Qwen2.5-0.5B has 14 query heads over 2 KV heads, so each layer writes 7 copies of the whole cache per
token. Here the query heads that share a KV head are laid side by side as rows of one query instead, which is the
same product (rounding aside) and touches the cache once. Prompts and drafts (several query tokens, causal) keep
the stock path.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "toolace_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if q_len != 1 or kv_heads == heads or per_head_mask or "position_bias" in kwargs:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # query heads h = g * groups + r use KV head g (repeat_kv's order): [batch, kv_heads, groups, dim]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, 1, heads, dim), None  # [batch, q_len, heads, dim], as sdpa_attention_forward returns


def register() -> str:
    """Make `NAME` usable as `attn_implementation` (masks built as for SDPA); returns it."""
    AttentionInterface.register(NAME, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
