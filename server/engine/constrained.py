"""Constrained decoding for the transformers engine, on llguidance: JSON schemas and Lark grammars.

llguidance (the Rust library behind vLLM's and SGLang's structured outputs) computes the set of tokens a grammar
allows next in well under a millisecond. One matcher per sampled row; the mask is applied to the row's logits
before greedy or sampled selection, and every emitted token is fed back to the matcher.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # declared in llguidance's stub only

log = logging.getLogger(__name__)

# Compact JSON: no runs of whitespace for a small model to wander into. Lenient: a keyword llguidance does not
# implement (an unknown `format`, say) is ignored rather than refused, as OpenAI's non-strict tool schemas are.
GRAMMAR_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": True}


def schema_error(schema: Mapping[str, Any]) -> str:
    """Why no answer can be decoded under `schema` (unknown type, unsatisfiable enum, bad pattern, dangling $ref...);
    "" when it can. Checked per request before any work, so that the engine's matchers never fail."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=GRAMMAR_DEFAULTS)
    except (ValueError, TypeError) as exc:
        return str(exc) or type(exc).__name__
    return llguidance.LLMatcher.validate_grammar(grammar)


@functools.lru_cache(maxsize=256)
def grammar_error(grammar: str) -> str:
    """Why llguidance cannot compile this Lark grammar (server/tool_grammar.py); "" when it can. Special tokens
    it names are checked when a matcher is built over the tokenizer, not here. Cached: a client sends the same
    tools again and again."""
    return llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar))


def added_tokens(tokenizer: Any) -> frozenset[str]:
    """The tokenizer's added tokens (llguidance treats each as a special token, typed text never matches it)."""
    vocab: object = getattr(tokenizer, "get_added_vocab", lambda: {})()
    return frozenset(vocab) if isinstance(vocab, Mapping) else frozenset()


class SchemaConstraints:
    """Builds per-row matchers; the tokenizer is indexed once, on first use. Building a matcher compiles its grammar
    (tens of ms over a large vocabulary); copying a built one takes microseconds, so the last few grammars are kept
    unused and each row gets a copy: refine rounds and clients repeating their tools pay the compile once."""

    KEPT = 16

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._eos_ids = sorted(eos_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._built: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> pristine matcher

    def matcher(self, schema: Mapping[str, Any]) -> llguidance.LLMatcher:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=GRAMMAR_DEFAULTS)
        return self._matcher(grammar, "schema")

    def grammar_matcher(self, lark: str) -> llguidance.LLMatcher:
        return self._matcher(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")

    def _matcher(self, grammar: str, what: str) -> llguidance.LLMatcher:
        if self._ll_tokenizer is None:
            start = time.perf_counter()
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=self._eos_ids)
            log.info("constrained decoding: tokenizer indexed in %.1f s", time.perf_counter() - start)
        matcher = self._built.get(grammar)
        if matcher is None:
            matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
            if matcher.is_error():
                raise ValueError(f"cannot decode under this {what}: {matcher.get_error()}")
            self._built[grammar] = matcher
            if len(self._built) > self.KEPT:
                self._built.popitem(last=False)
        self._built.move_to_end(grammar)
        return matcher.deep_copy()


def mask_disallowed(logits: torch.Tensor, matcher: llguidance.LLMatcher) -> torch.Tensor:
    """`logits` (1-D float32) with every token the grammar does not allow next set to -inf."""
    size = logits.numel()
    bitmask = allocate_token_bitmask(1, size)
    fill_next_token_bitmask(matcher, bitmask, 0)
    if matcher.is_error():  # e.g. a grammar past llguidance's limits: no mask rather than one allowing nothing
        return logits
    # numpy, not torch: one vocabulary-sized op, not worth waking a thread pool for
    allowed = np.unpackbits(bitmask[0].numpy().view(np.uint8), count=size, bitorder="little").astype(bool)
    return torch.from_numpy(np.where(allowed, logits.numpy(), np.float32(-np.inf)))
