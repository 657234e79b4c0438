"""Choosing each row's next token: greedy or sampled (temperature, top-p, per-sample seeds), under the row's schema or
grammar mask, with log-probabilities when asked; and draft verification (how much of a draft greedy decoding
would produce)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from llguidance import LLMatcher

from server.engine.base import SampledToken, SamplingParams, seed_for
from server.engine.constrained import SchemaConstraints, mask_disallowed
from server.engine.jobs import Row

log = logging.getLogger(__name__)


class TokenSampler:
    def __init__(self, constraints: SchemaConstraints, decode: Callable[[list[int]], str]) -> None:
        self._constraints = constraints
        self._decode_text = decode

    def matcher(self, params: SamplingParams) -> LLMatcher | None:
        if params.json_schema is not None:
            return self._constraints.matcher(params.json_schema)
        if params.grammar is None:
            return None
        try:
            return self._constraints.grammar_matcher(params.grammar)
        except ValueError as exc:  # the caller checked it compiles; a tokenizer may still refuse it (special tokens)
            log.warning("decoding without the grammar: %s", exc)
            return None

    @staticmethod
    def generator(params: SamplingParams, k: int) -> torch.Generator | None:
        if params.greedy:
            return None
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed_for(params.seed, k))
        return generator

    def sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        tokens = self._choose(logits, rows)
        for i, row in enumerate(rows):
            if row.job.params.logprobs is not None:
                row.logprobs.append(self._logprob(logits[i], tokens[i], row.job.params.logprobs))
        return tokens

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> SampledToken:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = logprobs.topk(top) if top else None
        alternatives = zip(best.indices.tolist(), best.values.tolist(), strict=True) if best is not None else ()
        return SampledToken(
            self._decode_text([token]),
            float(logprobs[token]),
            tuple((self._decode_text([t]), lp) for t, lp in alternatives),
        )

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            params = row.job.params
            if params.greedy and row.matcher is None:
                continue
            scores = logits[i].float()
            if row.matcher is not None:
                scores = mask_disallowed(scores, row.matcher)
            if params.greedy:
                tokens[i] = int(scores.argmax())
                continue
            probs = torch.softmax(scores / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
        return tokens

    def verify_draft(self, row: Row, logits: torch.Tensor, attention: torch.Tensor) -> list[int]:
        """Accept the longest draft prefix greedy decoding agrees with; hide the rest of it from attention.
        Returns the tokens to emit: the accepted draft tokens, then the model's own next token (under the row's
        schema or grammar, if it has one: its best allowed token)."""
        draft = row.job.draft
        window = logits[logits.shape[0] - len(draft) - 1 :]
        predicted = window.argmax(dim=-1).tolist()
        if row.matcher is None:
            accepted = next((j for j, (p, d) in enumerate(zip(predicted, draft, strict=False)) if p != d), len(draft))
            following = predicted[accepted]
        else:
            accepted, following = verify_under_mask(row.matcher, draft, window, predicted)
        if accepted < len(draft):
            attention[attention.shape[0] - (len(draft) - accepted) :] = 0
        row.fed.extend(draft[:accepted])
        row.job.draft_accepted = accepted
        return draft[:accepted] + [following]


def verify_under_mask(
    matcher: LLMatcher, draft: list[int], window: torch.Tensor, predicted: list[int]
) -> tuple[int, int]:
    """How much of a draft greedy decoding under a grammar agrees with, and its token after that. Under the mask
    greedy decoding takes the best token the matcher allows: the model's own choice where it is allowed (no mask
    to compute), the masked choice elsewhere, which a draft written under the same grammar often is too."""
    probe = matcher.deep_copy()  # the row's matcher takes the emitted tokens afterwards, as for any token
    for j, token in enumerate(draft):
        if predicted[j] == token and probe.validate_tokens([token]) == 1:
            choice = token
        else:
            choice = int(mask_disallowed(window[j].float(), probe).argmax())
        if choice != token:
            return j, choice
        probe.consume_token(token)
    # after a draft that ends its turn, the token chosen here is never used
    return len(draft), int(mask_disallowed(window[len(draft)].float(), probe).argmax())
