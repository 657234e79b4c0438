"""The LoRA adapter registry: which adapters exist, which are loaded, and the checks before one is accepted.

An adapter is a directory under the adapters root: `adapter_model.safetensors`, `adapter_config.json` and, when the
training package made it, `manifest.json` (base model name and checksum). Registered adapters are routable by name;
at most `max_loaded` of them sit in the engine, loaded on first use and dropped least recently used first. An
adapter that a request is using is never dropped.

What is checked before an adapter is accepted, since a path may come from an HTTP request:
- the path resolves inside the root (no `..`, no absolute path elsewhere, no symlink out of it, the files included);
- weights are safetensors, and no pickle file lies beside them (peft would prefer safetensors, but a directory
  that ships a pickle is refused outright rather than trusted to be ignored);
- the rank is at most `max_rank`, and every LoRA tensor fits a linear layer of the served base model (read from
  the safetensors headers of both, without loading any weights);
- when a manifest names the base model's checksum, it is the served model's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from server.engine import Engine, EngineError
from server.errors import APIError, BadRequest, NotFound
from server.model_store import base_sha256
from server.prompts import PromptFormat

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# peft names a LoRA tensor "base_model.model.<module path>.lora_A.weight" (or lora_B).
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight")


class AdapterError(Exception):
    """An adapter that cannot be accepted; the message says why and is safe to show the client."""

    def __init__(self, message: str, *, param: str = "lora_path", status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status

    def api_error(self, param: str | None = None) -> APIError:
        error = NotFound if self.status == 404 else BadRequest
        return error(str(self), param=param or self.param)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    rank: int
    manifest: dict[str, Any] | None

    @property
    def prompt_format(self) -> PromptFormat | None:
        """The prompt the adapter was trained on (its manifest's `prompt_format`): it is served with that one."""
        value = (self.manifest or {}).get("prompt_format")
        return PromptFormat(value) if value in {f.value for f in PromptFormat} else None


@dataclass(frozen=True)
class BaseModel:
    """What an adapter is checked against: the served checkpoint's linear layers and its checksum."""

    linear_shapes: dict[str, tuple[int, int]]  # module path -> (out_features, in_features)
    sha256: str | None

    @classmethod
    def from_dir(cls, model_dir: Path) -> BaseModel:
        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(file), "pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shape = weights.get_slice(key).get_shape()
                    if key.endswith(".weight") and len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (shape[0], shape[1])
        return cls(shapes, base_sha256(model_dir))


def check_name(name: str, base_names: Collection[str]) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise AdapterError(
            "An adapter name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            param="lora_name",
        )
    if name in base_names:
        raise AdapterError(f"'{name}' is the base model's name.", param="lora_name")


def resolve_inside(root: Path, given: str | Path) -> Path:
    """`given` (relative to root, or absolute) as a real path inside root; AdapterError otherwise."""
    root = root.resolve()
    candidate = Path(given)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise AdapterError("The adapter path must lie inside the server's adapters directory.")
    if not path.is_dir():
        raise AdapterError(f"No adapter directory at '{given}'.")
    return path


def inspect(name: str, path: Path, root: Path, base: BaseModel, max_rank: int) -> AdapterInfo:
    """Every check short of loading the weights; returns what the registry keeps."""
    root = root.resolve()
    for item in path.iterdir():
        if item.name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(f"'{item.name}' is a pickle file; adapters are loaded from safetensors only.")
        if not item.resolve().is_relative_to(root):
            raise AdapterError(f"'{item.name}' links outside the adapters directory.")
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise AdapterError(f"An adapter directory holds {WEIGHTS} and {CONFIG}.")
    try:
        config = json.loads((path / CONFIG).read_text())
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{CONFIG} is not a LoRA configuration ({exc}).") from exc
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"The adapter's rank is {rank}; this server accepts ranks 1 to {max_rank}.")
    _check_tensors(path / WEIGHTS, rank, base)
    manifest = _manifest(path, base)
    return AdapterInfo(name, path, rank, manifest)


def _check_tensors(weights: Path, rank: int, base: BaseModel) -> None:
    try:
        with safe_open(str(weights), "pt") as tensors:
            shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}  # noqa: SIM118
    except Exception as exc:  # a truncated or foreign file; safetensors raises several types
        raise AdapterError(f"{WEIGHTS} is not a readable safetensors file ({exc}).") from exc
    if not shapes:
        raise AdapterError(f"{WEIGHTS} holds no tensors.")
    for key, shape in shapes.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"Unexpected tensor '{key}': only LoRA A/B matrices of linear layers are served.")
        layer = base.linear_shapes.get(match["module"])
        if layer is None:
            raise AdapterError(f"Tensor '{key}' targets '{match['module']}', which the base model does not have.")
        out_features, in_features = layer
        expected = (rank, in_features) if match["part"] == "A" else (out_features, rank)
        if shape != expected:
            raise AdapterError(
                f"Tensor '{key}' has shape {list(shape)}; the base model and rank {rank} need {list(expected)}: "
                "the adapter was trained for another base model."
            )


def _manifest(path: Path, base: BaseModel) -> dict[str, Any] | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as exc:
        raise AdapterError(f"{MANIFEST} is not JSON ({exc}).") from exc
    wanted = (manifest.get("base_model") or {}).get("sha256")
    if wanted and base.sha256 and wanted != base.sha256:
        raise AdapterError(
            f"The adapter was trained on base model {manifest['base_model'].get('name', '?')} "
            f"(sha256 {wanted[:12]}…), not on the served model (sha256 {base.sha256[:12]}…)."
        )
    return manifest


class AdapterRegistry:
    """Registered adapters by name; loads them into the engine on use, keeping at most `max_loaded` there."""

    def __init__(
        self,
        engine: Engine,
        root: Path,
        base: BaseModel,
        base_names: Collection[str],
        *,
        max_loaded: int = 4,
        max_rank: int = 64,
    ) -> None:
        self.engine, self.root, self.base = engine, root, base
        self.base_names = frozenset(base_names)  # the base model's served name and its aliases
        self.max_loaded, self.max_rank = max_loaded, max_rank
        self._known: dict[str, AdapterInfo] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._in_use: dict[str, int] = {}
        self._lock = asyncio.Lock()  # one load/unload at a time

    def names(self) -> list[str]:
        return sorted(self._known)

    def info(self, name: str) -> AdapterInfo | None:
        return self._known.get(name)

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def scan(self) -> None:
        """Register every acceptable adapter directory under the root (at start); log the ones skipped."""
        if not self.root.is_dir():
            return
        for path in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                self._register(path.name, path.name)  # relative to the root, as an admin load gives it
            except AdapterError as exc:
                log.warning("adapter %s skipped: %s", path.name, exc)

    def _register(self, name: str, given: str | Path) -> AdapterInfo:
        check_name(name, self.base_names)
        info = inspect(name, resolve_inside(self.root, given), self.root, self.base, self.max_rank)
        if info.manifest is None:
            log.warning("adapter %s has no %s: its base model is checked by tensor shapes only", name, MANIFEST)
        self._known[name] = info
        log.info("adapter %s registered (rank %d, %s)", name, info.rank, info.path)
        return info

    async def add(self, name: str, given: str | Path | None) -> AdapterInfo:
        """Register and load at once (the hot-load endpoint): a bad adapter fails here, not on a later request."""
        if name in self._known:
            raise AdapterError(f"An adapter named '{name}' is already loaded.", param="lora_name")
        info = self._register(name, given if given is not None else name)
        try:
            async with self.use(name):
                pass
        except AdapterError:
            del self._known[name]
            raise
        return info

    async def remove(self, name: str) -> None:
        if name not in self._known:
            raise AdapterError(f"No adapter named '{name}' is loaded.", param="lora_name", status=404)
        del self._known[name]  # new requests stop routing to it; running ones finish (see use)
        async with self._lock:
            if name in self._loaded and not self._in_use.get(name):
                await self._unload(name)

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[None]:
        """Hold `name` loaded in the engine for the duration (None: the base model, nothing to do)."""
        if name is None:
            yield
            return
        self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            async with self._lock:
                if name not in self._loaded:
                    await self._load(name)
                self._loaded.move_to_end(name)
            yield
        finally:
            self._in_use[name] -= 1
            if not self._in_use[name]:
                del self._in_use[name]
                if name not in self._known and name in self._loaded:  # removed while it was running
                    async with self._lock:
                        await self._unload(name)

    async def _load(self, name: str) -> None:
        idle = [n for n in self._loaded if not self._in_use.get(n)]
        while len(self._loaded) >= self.max_loaded and idle:
            await self._unload(idle.pop(0))
        info = self._known.get(name)
        if info is None:
            raise AdapterError(f"No adapter named '{name}'.", param="model", status=404)
        try:
            await self.engine.load_adapter(name, info.path)
        except (EngineError, ValueError, KeyError, RuntimeError, OSError) as exc:
            raise AdapterError(f"The engine could not load the adapter: {exc}") from exc
        self._loaded[name] = None
        log.info("adapter %s loaded (%d of at most %d in the engine)", name, len(self._loaded), self.max_loaded)

    async def _unload(self, name: str) -> None:
        await self.engine.unload_adapter(name)
        self._loaded.pop(name, None)
        log.info("adapter %s unloaded", name)
