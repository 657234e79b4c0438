"""The engine contract: what the serving layer and the training package may ask of a model backend."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs from Python 3.13

FinishReason = Literal["stop", "length", "abort"]
ChatMessage = Mapping[str, Any]


# Below this, temperature scaling overflows float32 (NaN probabilities): such a request is decoded greedily, as the
# limit of sampling at temperature -> 0 is (vLLM draws the same line).
MIN_SAMPLING_TEMPERATURE = 1e-5
SEED_SPACE = 2**63  # seeds are taken modulo this: any integer a client sends is a valid, reproducible seed


def seed_for(seed: int, offset: int = 0) -> int:
    """The engine seed for sample `offset` of a request seeded with `seed` (a client may send any integer)."""
    return (seed + offset) % SEED_SPACE


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. A temperature below MIN_SAMPLING_TEMPERATURE (0 included) means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    json_schema: Mapping[str, Any] | None = None  # constrain the output to JSON following this schema
    # Constrain the output to this Lark grammar (llguidance's dialect; server/tool_grammar.py builds the lazy
    # tool-call grammar of tool_choice "auto"). Ignored when json_schema is set. An engine that cannot compile it
    # decodes freely rather than fail the request.
    grammar: str | None = None
    # Report each output token's log-probability plus this many of the most likely alternatives (None: no report).
    # They are the model's own distribution, before temperature, top_p or a schema mask (as vLLM's default).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True)
class SampledToken:
    """One output token, its log-probability, and the most likely tokens at its position (most likely first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stop_token_id: int | None = None  # the end-of-sequence token that ended it, if one did
    logprobs: tuple[SampledToken, ...] | None = None  # one per token id, when asked for

    @property
    def as_draft(self) -> list[int]:
        """This completion as a draft for a request expected to repeat it, ending where it ended."""
        return [*self.token_ids, *([self.stop_token_id] if self.stop_token_id is not None else [])]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Generation:
    """The result of one generate call: the prompt's size and `n` completions (vLLM's RequestOutput shape)."""

    prompt_tokens: int
    completions: tuple[Completion, ...] = field(default_factory=tuple)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    draft_tokens: int = 0  # draft tokens offered for verification
    draft_accepted_tokens: int = 0  # of those, the ones greedy decoding agreed with

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)

    @property
    def finish_reason(self) -> FinishReason:
        return self.completions[0].finish_reason


class EngineError(Exception):
    """A request the engine cannot run (unknown adapter, prompt too long...); the caller maps it to a 4xx."""


@runtime_checkable
class Engine(Protocol):
    """An async text generator over one base model, with optional LoRA adapters.

    Implementations must never block the caller's event loop: model work runs in a worker thread or process.
    """

    model_name: str
    max_model_len: int

    def encode_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Render messages with the model's chat template (generation prompt appended) into token ids."""
        ...

    async def generate(
        self,
        prompt: Sequence[int] | Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
        draft: Sequence[int] | None = None,
        cache_salt: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate `params.n` completions for token ids or chat messages; raise EngineError for bad input.

        `draft` (greedy only, ignored otherwise) is the completion the caller expects, e.g. the previous refine
        round's answer: the engine may verify it in one pass instead of decoding it token by token. The result is
        the same text either way. `cache_salt` keeps the request from sharing cached prefixes with requests that
        carry another salt (isolation between tenants, or clean benchmarks). `on_text` (n=1 only) is called on the
        caller's event loop with each new piece of text as it is generated."""
        ...

    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters."""
        ...

    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft LoRA directory (already checked by the adapter registry) under `name`."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    async def close(self) -> None: ...


def is_token_ids(prompt: Sequence[int] | Sequence[ChatMessage]) -> TypeIs[Sequence[int]]:
    return all(isinstance(t, int) for t in prompt)


def encode_chat(
    tokenizer: Any, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None
) -> list[int]:
    """A conversation as prompt token ids: the tokenizer's chat template, ending where the assistant answers.
    Every backend encodes through this, so the same request is the same prompt on each."""
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def model_configs(model_dir: Path) -> list[Any]:
    """A checkpoint's configs read from disk, for engines that do not load the weights here: the generation config
    (when there is one) and the model config, the order `eos_token_ids` reads them in."""
    from transformers import AutoConfig, GenerationConfig

    configs: list[Any] = [AutoConfig.from_pretrained(model_dir)]
    with contextlib.suppress(OSError):  # no generation_config.json
        configs.insert(0, GenerationConfig.from_pretrained(model_dir))
    return configs


def context_length(config: Any, max_model_len: int | None) -> int:
    """The model's context length (its config's), capped at `max_model_len` when given."""
    config_len = int(getattr(config, "max_position_embeddings", 2048))
    return min(config_len, max_model_len) if max_model_len else config_len


def eos_token_ids(tokenizer: Any, configs: Sequence[Any]) -> set[int]:
    """The tokens that end a turn: every `eos_token_id` the model's configs name, and the tokenizer's own."""
    ids: set[int] = set()
    for config in configs:
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def checked_prompt_ids(
    prompt: Sequence[int] | Sequence[ChatMessage],
    params: SamplingParams,
    max_model_len: int,
    encode: Callable[[Sequence[ChatMessage]], list[int]],
) -> list[int]:
    """The prompt as token ids, checked the same way by every backend; EngineError for what cannot run."""
    ids = list(prompt) if is_token_ids(prompt) else encode(prompt)
    if not ids:
        raise EngineError("the prompt is empty")
    if len(ids) + params.max_tokens > max_model_len:
        raise EngineError(
            f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
            f"context length ({max_model_len})"
        )
    if params.n < 1:
        raise EngineError("n must be at least 1")
    return ids
