"""`toolace-r` command line: `serve` and `model prepare|list`, plus commands other packages plug in.

Other packages (training: `train`, `eval`) add subcommands through the `toolace_r.commands` entry-point group:
each entry point is a function `register(subparsers)` that adds a parser and sets `func=` to its handler. That keeps
dependencies pointing one way: `server` never imports `training`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from server import model_store
from server.engine import ENGINES
from server.engine.dtypes import DTYPES
from server.limits import Limits
from server.prompts import PromptFormat
from server.refine import MAX_ITERATIONS_LIMIT

LIMIT_HELP = {
    "max_body_bytes": "request body size (413 beyond)",
    "max_json_depth": "nesting of arrays and objects in the body",
    "max_tokens": "cap on a request's max_tokens / max_completion_tokens",
    "max_n": "cap on n (choices per request)",
    "max_refine_iterations": f"cap on max_refine_iterations (at most {MAX_ITERATIONS_LIMIT})",
    "max_tools": "tools per request",
    "max_tool_schema_bytes": "size of one tool's parameters schema, as JSON",
    "max_active_requests": "requests running at once",
    "max_queued_requests": "requests waiting for a running slot; beyond that, 429 with Retry-After",
    "request_timeout": "seconds a request may take, waiting included; then 504 and its work stops",
}


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model",
        default="default",
        help=f"'default', one of {', '.join(model_store.EMBEDDED_MODELS)}, or a Hugging Face directory",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the name(s) clients send as `model` for the base model (default: --model); answers carry the first, "
        "the others are aliases for clients that insist on a name (BFCL's runner sends gpt-4o-2024-11-20)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="transformers",
        help="transformers (CPU, the default), vllm (GPU), llamacpp (CPU, llama-server on the GGUF; built once)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOOLACE_R_API_KEY"),
        help="require this bearer key on /v1/* and /metrics (env TOOLACE_R_API_KEY)",
    )
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument(
        "--adapters-dir",
        type=Path,
        default=Path(os.environ.get("TOOLACE_R_ADAPTERS_DIR", "adapters")),
        help="LoRA adapters served by name; every one made for the served model is registered at start",
    )
    p.add_argument(
        "--admin-api-key",
        default=os.environ.get("TOOLACE_R_ADMIN_API_KEY"),
        help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter; they are off without one",
    )
    p.add_argument("--max-loaded-adapters", type=int, default=4, help="adapters kept in the engine (LRU)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    p.add_argument(
        "--prompt-format",
        choices=[f.value for f in PromptFormat],
        default=PromptFormat.PYTHONIC.value,
        help="pythonic: the paper's system prompt and [f(a=1)] calls; native: the model's chat template",
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together by the engine")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + completion tokens")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="model weights on the CPU; auto: bfloat16 where the CPU computes it natively, else float32 (faster "
        "prefill there, slower small-batch decode)",
    )
    p.add_argument("--default-temperature", type=float, default=0.0, help="used when a request sets none")
    p.add_argument("--default-max-tokens", type=int, default=512, help="used when a request sets none")
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=65536,
        help="KV cache kept for prompt prefixes (refine rounds, shared system prompts); 0 turns it off",
    )
    p.add_argument(
        "--no-draft-refinement",
        dest="draft_refinement",
        action="store_false",
        help="decode every greedy refine round in full instead of verifying the previous answer as a draft",
    )
    p.add_argument(
        "--tool-grammar",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='decode tool_choice "auto" under the lazy grammar that keeps tool calls well-formed (off by default '
        "until BFCL measures it)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-prompts", action="store_true", help="add each request's messages to its access-log line")
    p.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM"
    )
    vllm = p.add_argument_group("vLLM engine (--engine vllm only; --max-loaded-adapters sets its max_cpu_loras)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one model is split across")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory vLLM takes")
    vllm.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV cache across requests and refine rounds (--no-enable-prefix-caching turns it off)",
    )
    vllm.add_argument(
        "--enable-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve LoRA adapters (--no-enable-lora saves the LoRA kernels' memory and time when none are used)",
    )
    vllm.add_argument("--max-loras", type=int, default=4, help="different adapters in one batch")
    llamacpp = p.add_argument_group("llama.cpp engine (--engine llamacpp only)")
    llamacpp.add_argument(
        "--gguf", type=Path, default=None, help="the GGUF llama.cpp runs (default: the embedded model's own file)"
    )
    llamacpp.add_argument(
        "--prompt-lookup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draft from n-grams of the prompt (refine rounds repeat their previous answer); off for sampling-heavy "
        "loads, where every rejected draft costs a batch",
    )
    limits = p.add_argument_group("limits (a request beyond one is refused before any work)")
    for field in dataclasses.fields(Limits):
        flag = "--" + field.name.replace("_", "-")
        limits.add_argument(flag, type=type(field.default), default=field.default, help=LIMIT_HELP[field.name])


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM once its graceful shutdown is done, so the process ends "killed by SIGTERM";
        a finished graceful shutdown is a clean exit, status 0, for supervisors and orchestrators."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


def _engine_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The `serve` flags the chosen engine takes."""
    options: dict[str, Any] = {
        "model_name": name,
        "max_batch_size": args.max_batch_size,
        "max_model_len": args.max_model_len,
        "prefix_cache_tokens": args.prefix_cache_tokens,
        "dtype": args.dtype,
    }
    if args.engine == "vllm":
        options |= {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enable_prefix_caching": args.enable_prefix_caching and args.prefix_cache_tokens > 0,
            "enable_lora": args.enable_lora,
            "max_loras": args.max_loras,
            "max_lora_rank": args.max_lora_rank,
            "max_cpu_loras": args.max_loaded_adapters,
        }
    if args.engine == "llamacpp":
        options |= {"gguf": args.gguf or model_store.gguf_path(args.model), "prompt_lookup": args.prompt_lookup}
    return options


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.adapters import AdapterRegistry, BaseModel
    from server.api import create_app
    from server.config import ServingConfig
    from server.engine import create_engine
    from server.serving import ChatService

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = model_store.resolve(args.model)
    name, *aliases = args.served_model_name or [model_store.model_name(args.model)]
    engine = create_engine(args.engine, str(model_dir), **_engine_options(args, name))
    config = ServingConfig(
        served_model_name=name,
        model_aliases=tuple(aliases),
        prompt_format=PromptFormat(args.prompt_format),
        default_temperature=args.default_temperature,
        default_max_tokens=args.default_max_tokens,
        draft_refinement=args.draft_refinement,
        tool_grammar=args.tool_grammar,
        limits=Limits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)}),
        log_prompts=args.log_prompts,
    )
    registry = AdapterRegistry(
        engine,
        args.adapters_dir,
        BaseModel.from_dir(model_dir),
        (name, *aliases),
        max_loaded=args.max_loaded_adapters,
        max_rank=args.max_lora_rank,
    )
    registry.scan()
    app = create_app(
        ChatService(engine, config, adapters=registry),
        api_key=args.api_key,
        admin_api_key=args.admin_api_key,
        metrics_public=args.metrics_public,
    )
    # SIGTERM: uvicorn stops accepting, lets in-flight requests finish for up to --shutdown-grace s, then the
    # lifespan closes the engine; our access log replaces uvicorn's.
    http_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=args.shutdown_grace,
    )
    _graceful_server_class()(http_config).run()
    return 0


def _model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="manage the embedded models")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="assemble, verify and convert an embedded model; prints its path")
    prepare.add_argument(
        "name", nargs="?", default=model_store.DEFAULT_MODEL, choices=list(model_store.EMBEDDED_MODELS)
    )
    model_sub.add_parser("list", help="list the embedded models")


def _model(args: argparse.Namespace) -> int:
    if args.model_command == "list":
        for name in model_store.EMBEDDED_MODELS:
            suffix = " (default)" if name == model_store.DEFAULT_MODEL else ""
            print(f"{name}{suffix}")
        return 0
    print(model_store.prepare(args.name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="toolace-r", description="ToolACE-R tool-calling server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _model_parser(sub)
    for plugin in entry_points(group="toolace_r.commands"):
        plugin.load()(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "model":
            return _model(args)
        return int(args.func(args) or 0)
    except model_store.ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
