"""Model backends behind one async `Engine` protocol (see base.py)."""

from server.engine.base import (
    ChatMessage,
    Completion,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    SampledToken,
    SamplingParams,
)

ENGINES = ("transformers", "vllm", "llamacpp")

__all__ = [
    "ENGINES",
    "ChatMessage",
    "Completion",
    "Engine",
    "EngineError",
    "FinishReason",
    "Generation",
    "SamplingParams",
    "SampledToken",
    "create_engine",
]


def create_engine(kind: str, model_dir: str, **options: object) -> Engine:
    """Build the named backend; heavy imports happen here, not at package import."""
    if kind == "transformers":
        from server.engine.transformers import TransformersEngine

        return TransformersEngine(model_dir, **options)  # type: ignore[arg-type]
    if kind == "vllm":
        from server.engine.vllm import VllmEngine

        return VllmEngine(model_dir, **options)  # type: ignore[arg-type]
    if kind == "llamacpp":
        from server.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine(model_dir, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")
