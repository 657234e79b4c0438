"""The grouped decode-step attention gives what transformers' own SDPA path gives, in a real (tiny) model too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine import grouped_attention


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _padded_mask(batch: int, q_len: int, kv_len: int, pads: list[int]) -> torch.Tensor:
    """Boolean [batch, 1, q_len, kv_len]: row b hides its first pads[b] positions (left padding) and is causal."""
    keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b, pad in enumerate(pads):
        keep[b, :, :, :pad] = False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return keep & causal


def test_a_decode_step_matches_the_repeated_kv_path() -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, kv_len = 3, 14, 2, 64, 40
    module = _Attention(heads // kv_heads)
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    mask = _padded_mask(batch, 1, kv_len, [0, 7, 30])
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)
    got, _ = grouped_attention.grouped_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5)
    assert got.shape == expected.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a head that attended to the padding would differ: the mask is honoured per row
    unmasked, _ = grouped_attention.grouped_sdpa_attention(module, query, key, value, None, scaling=dim**-0.5)
    assert not torch.allclose(unmasked[2], expected[2], atol=1e-3)


def test_several_query_tokens_take_the_stock_path_unchanged() -> None:
    torch.manual_seed(1)
    module = _Attention(2)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = _padded_mask(2, 5, 9, [0, 3])
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    got, _ = grouped_attention.grouped_sdpa_attention(module, query, key, value, mask)
    assert torch.equal(got, expected)


def test_a_model_decodes_the_same_tokens_with_it() -> None:
    """A tiny random Llama with 4 query heads over 2 KV heads: a left-padded batch, prefill then 6 greedy steps."""
    settings = dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5,  # sharp attention: a wrong one shows
    )  # fmt: skip
    torch.manual_seed(2)
    # one config each: from_config records the attention implementation in the config it is given
    stock = AutoModelForCausalLM.from_config(LlamaConfig(**settings), attn_implementation="sdpa").eval()
    grouped = AutoModelForCausalLM.from_config(
        LlamaConfig(**settings), attn_implementation=grouped_attention.register()
    )
    assert (stock.config._attn_implementation, grouped.config._attn_implementation) == ("sdpa", grouped_attention.NAME)
    grouped.eval().load_state_dict(stock.state_dict())
    ids = torch.randint(1, 97, (2, 12))
    attention = torch.ones(2, 12, dtype=torch.long)
    attention[1, :5] = 0  # the second row is 7 tokens, left-padded

    def decode(model: torch.nn.Module) -> tuple[list[list[int]], torch.Tensor]:
        cache, mask, tokens, out = DynamicCache(), attention.clone(), ids, []
        with torch.no_grad():
            for _ in range(7):
                logits = model(input_ids=tokens, attention_mask=mask, past_key_values=cache, use_cache=True).logits
                tokens = logits[:, -1:].argmax(-1)
                out.append(tokens.squeeze(1).tolist())
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        return out, logits

    stock_tokens, stock_logits = decode(stock)
    grouped_tokens, grouped_logits = decode(grouped)
    assert grouped_tokens == stock_tokens
    torch.testing.assert_close(grouped_logits, stock_logits, rtol=1e-4, atol=1e-4)


def test_the_engine_uses_it_by_default(smol_dir: Path) -> None:
    from server.engine.transformers import TransformersEngine

    engine = TransformersEngine(smol_dir, max_batch_size=1)
    try:
        assert engine.model.config._attn_implementation == grouped_attention.NAME
    finally:
        asyncio.run(engine.close())
