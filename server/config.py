"""How the server treats requests: its names for the model, defaults, limits (set by `toolace-r serve`)."""

from __future__ import annotations

from dataclasses import dataclass

from server.limits import Limits
from server.prompts import PromptFormat


@dataclass(frozen=True)
class ServingConfig:
    served_model_name: str
    model_aliases: tuple[str, ...] = ()  # more names clients may send for the base model (answers name the first)
    prompt_format: PromptFormat = PromptFormat.PYTHONIC
    default_temperature: float = 0.0  # greedy unless asked: refinement converges on deterministic answers
    default_max_tokens: int = 512
    # Greedy refine rounds hand the previous answer to the engine as a draft to verify in one pass (exact).
    draft_refinement: bool = True
    # tool_choice "auto" decodes under the lazy tool-call grammar (server/tool_grammar.py): free text, well-formed
    # calls. A request's `tool_grammar` field overrides it. Off until BFCL measures it better (RESULTS.md).
    tool_grammar: bool = False
    limits: Limits = Limits()
    log_prompts: bool = False  # the access log carries no request content unless asked
