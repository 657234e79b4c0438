"""LoRA adapters through HTTP: registered at start, routed by model name, hot loaded and unloaded, checked first.

The adapters are real peft LoRAs on SmolLM2 with random (non-zero) B matrices, so an adapter's greedy answer
differs from the base model's and routing is visible in the output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server import model_store
from tests.conftest import REPO, SMOL, RunningServer, make_lora, start_server

ADMIN_KEY = "admin-key"
ALIAS = "gpt-4o-2024-11-20"  # what BFCL's own runner sends as `model`
PROMPT = [{"role": "user", "content": "Name a color."}]
TARGETS = ("q_proj", "v_proj")
SHADE = "shade-0.5b.v2"  # hot-loaded; dots as in the names `toolace-r train` gives (peft refuses them in its own)


def write_manifest(adapter: Path, sha256: str, **fields: Any) -> None:
    manifest = {"name": adapter.name, "base_model": {"name": SMOL, "sha256": sha256}, **fields}
    (adapter / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def layout(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapters root with good and bad adapters, plus a directory outside it."""
    top = tmp_path_factory.mktemp("adapters-layout")
    root, outside = top / "adapters", top / "outside"
    root.mkdir()
    sha = model_store.EMBEDDED_MODELS[SMOL].sha256
    make_lora(smol_dir, root / "color", seed=1, targets=TARGETS)
    write_manifest(root / "color", sha)
    make_lora(smol_dir, root / "staging" / SHADE, seed=2, targets=TARGETS)  # not registered at start: a level too deep
    write_manifest(root / "staging" / SHADE, sha)
    shutil.copytree(root / "color", root / "native-color")
    write_manifest(root / "native-color", sha, prompt_format="native")  # trained on the model's own template
    shutil.copytree(root / "color", root / "foreign")
    write_manifest(root / "foreign", "0" * 64)  # trained on another base model
    shutil.copytree(root / "color", root / "pickled")
    torch.save({"x": torch.zeros(1)}, root / "pickled" / "adapter_model.bin")
    make_lora(smol_dir, root / "wide", seed=3, rank=128, targets=("q_proj",))
    shutil.copytree(root / "color", root / "misshapen")
    config = json.loads((root / "misshapen" / "adapter_config.json").read_text())
    (root / "misshapen" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # tensors are rank 8
    shutil.copytree(root / "color", outside / "escaped")
    os.symlink(outside / "escaped", root / "link")
    shutil.copytree(root / "color", root / "linked-file")
    (root / "linked-file" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "escaped" / "adapter_model.safetensors", root / "linked-file" / "adapter_model.safetensors")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(layout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(
        SMOL,
        tmp_path_factory.mktemp("adapter-logs"),
        "--adapters-dir",
        os.path.relpath(layout["root"], REPO),  # relative, as the default `adapters` is
        "--admin-api-key",
        ADMIN_KEY,
        "--served-model-name",  # the base model's own name first (answers carry it), then an alias
        SMOL,
        ALIAS,
        "--max-loaded-adapters",
        "1",  # every switch between the two adapters evicts the other: LRU under test all along
        # Random adapters leave near-ties between tokens; in bf16 a cached and an uncached prefill of the same
        # prompt can break such a tie differently. float32 keeps "the same adapter gives the same answer" exact.
        "--dtype",
        "float32",
    )


def admin(server: RunningServer, action: str, body: dict[str, Any], key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/{action}_lora_adapter", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def answer(server: RunningServer, model: str) -> str:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": model, "messages": PROMPT, "max_tokens": 12},
        headers=server.headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def model_ids(server: RunningServer) -> dict[str, Any]:
    client = openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)
    return {m.id: m for m in client.models.list().data}


def test_start_registers_only_adapters_for_this_base(server: RunningServer) -> None:
    models = model_ids(server)
    assert set(models) == {SMOL, ALIAS, "color", "native-color"}
    assert models[ALIAS].model_extra["root"] == SMOL
    assert models["color"].model_extra["parent"] == SMOL
    log = server.log()
    for rejected in ("foreign", "pickled", "wide", "misshapen", "link", "linked-file"):
        assert f"adapter {rejected} skipped" in log


def test_routing_by_model_name(server: RunningServer) -> None:
    base, color = answer(server, SMOL), answer(server, "color")
    assert base != color
    assert answer(server, SMOL) == base and answer(server, "color") == color  # greedy: each stays itself


def test_an_alias_is_the_base_model(server: RunningServer) -> None:
    base = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": ALIAS, "messages": PROMPT, "max_tokens": 12},
        headers=server.headers,
        timeout=120,
    ).json()
    assert base["model"] == SMOL  # answers name the first --served-model-name, as vLLM's do
    assert base["choices"][0]["message"]["content"] == answer(server, SMOL) != answer(server, "color")


def test_an_adapter_is_served_in_the_prompt_format_its_manifest_names(server: RunningServer) -> None:
    """The server's format is pythonic (the paper's long system prompt); `native-color` was trained on the model's
    own chat template, which SmolLM2's renders without the tool list: the same request is a far shorter prompt."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    def prompt_tokens(model: str) -> int:
        body = {"model": model, "messages": PROMPT, "tools": tools, "max_tokens": 1}
        response = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    base, pythonic, native = prompt_tokens(SMOL), prompt_tokens("color"), prompt_tokens("native-color")
    assert base == pythonic  # no format in its manifest: the server's
    assert native < base - 100, (native, base)


def test_hot_load_route_unload_reload(server: RunningServer) -> None:
    loaded = admin(server, "load", {"lora_name": SHADE, "lora_path": f"staging/{SHADE}"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["rank"] == 8
    assert SHADE in model_ids(server)
    shade = answer(server, SHADE)
    assert shade not in (answer(server, SMOL), answer(server, "color"))

    again = admin(server, "load", {"lora_name": SHADE, "lora_path": f"staging/{SHADE}"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"

    assert admin(server, "unload", {"lora_name": SHADE}).status_code == 200
    assert SHADE not in model_ids(server)
    gone = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": SHADE, "messages": PROMPT},
        headers=server.headers,
        timeout=30,
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert admin(server, "unload", {"lora_name": SHADE}).status_code == 404

    assert admin(server, "load", {"lora_name": SHADE, "lora_path": f"staging/{SHADE}"}).status_code == 200
    assert answer(server, SHADE) == shade  # the same weights give the same answer after a reload
    assert admin(server, "unload", {"lora_name": SHADE}).status_code == 200


@pytest.mark.parametrize(
    ("lora_path", "why"),
    [
        ("../outside/escaped", "inside the server's adapters directory"),
        ("link", "inside the server's adapters directory"),
        ("linked-file", "links outside"),
        ("pickled", "pickle"),
        ("foreign", "not on the served model"),
        ("wide", "rank is 128"),
        ("misshapen", "has shape"),
        ("nowhere", "No adapter directory"),
        ("staging", "holds adapter_model.safetensors"),
    ],
)
def test_bad_adapters_are_refused(server: RunningServer, lora_path: str, why: str) -> None:
    response = admin(server, "load", {"lora_name": "bad", "lora_path": lora_path})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert why in error["message"] and error["param"] == "lora_path"
    assert "bad" not in model_ids(server)


def test_absolute_path_outside_the_root_is_refused(server: RunningServer, layout: dict[str, Path]) -> None:
    response = admin(server, "load", {"lora_name": "bad", "lora_path": str(layout["outside"] / "escaped")})
    assert response.status_code == 400 and "inside" in response.json()["error"]["message"]
    inside = admin(server, "load", {"lora_name": "abs", "lora_path": str(layout["root"] / "staging" / SHADE)})
    assert inside.status_code == 200, inside.text  # an absolute path inside the root is fine
    assert admin(server, "unload", {"lora_name": "abs"}).status_code == 200


def test_bad_names_are_refused(server: RunningServer) -> None:
    for name in ("../x", "", SMOL, ALIAS, "a" * 65):
        response = admin(server, "load", {"lora_name": name, "lora_path": f"staging/{SHADE}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name", name


def test_admin_routes_need_the_admin_key(server: RunningServer, smol_server: RunningServer) -> None:
    body = {"lora_name": SHADE, "lora_path": f"staging/{SHADE}"}
    assert admin(server, "load", body, key="wrong").status_code == 401
    assert admin(server, "load", body, key=server.api_key).status_code == 401  # the API key is not the admin key
    off = admin(smol_server, "load", body)  # a server started without --admin-api-key
    assert off.status_code == 404 and "--admin-api-key" in off.json()["error"]["message"]


def test_concurrent_requests_to_base_and_adapters_keep_their_own_outputs(server: RunningServer) -> None:
    before = len(server.log())
    assert admin(server, "load", {"lora_name": SHADE, "lora_path": f"staging/{SHADE}"}).status_code == 200
    try:
        expected = {model: answer(server, model) for model in (SMOL, "color", SHADE)}

        async def all_at_once() -> list[tuple[str, str]]:
            async with httpx.AsyncClient(headers=server.headers, timeout=300) as client:

                async def one(model: str) -> tuple[str, str]:
                    body = {"model": model, "messages": PROMPT, "max_tokens": 12}
                    response = await client.post(f"{server.v1}/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                    return model, response.json()["choices"][0]["message"]["content"]

                return await asyncio.gather(*(one(m) for m in [SMOL, "color", SHADE] * 3))

        results = asyncio.run(all_at_once())
        assert all(text == expected[model] for model, text in results), results
    finally:
        admin(server, "unload", {"lora_name": SHADE})
    assert "adapter color unloaded" in server.log()[before:]  # one slot (--max-loaded-adapters 1): LRU evictions


def test_metrics_per_adapter(server: RunningServer) -> None:
    answer(server, "color")
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers, timeout=10).text
    requests = {
        sample.labels["model"]
        for family in text_string_to_metric_families(text)
        if family.name == "toolace_requests"
        for sample in family.samples
    }
    assert {SMOL, "color"} <= requests


def test_engine_serves_the_base_after_unload_then_load(smol_dir: Path, layout: dict[str, Path]) -> None:
    """The sequence LRU eviction produces with one slot: A loaded, A unloaded, B loaded, then a base request. peft
    still names A as its active adapter then; the base request must not trip over it (it was a 500)."""
    from server.engine.base import SamplingParams
    from server.engine.transformers import TransformersEngine

    async def run() -> None:
        # No prefix cache: a prompt resumed from cached KV is not bit-identical to a fresh prefill in bfloat16 (on an
        # AVX-512 BF16 Xeon the same base request answered differently the second time), and this compares texts.
        engine = TransformersEngine(smol_dir, max_batch_size=2, prefix_cache_tokens=0)
        try:
            base = await engine.generate(PROMPT, SamplingParams(max_tokens=6))
            await engine.load_adapter(SHADE, layout["root"] / "staging" / SHADE)
            await engine.unload_adapter(SHADE)
            assert (await engine.generate(PROMPT, SamplingParams(max_tokens=6))).text == base.text  # no adapter left
            await engine.load_adapter("color", layout["root"] / "color")
            assert (await engine.generate(PROMPT, SamplingParams(max_tokens=6))).text == base.text
            colored = await engine.generate(PROMPT, SamplingParams(max_tokens=6), adapter="color")
            assert colored.text != base.text
        finally:
            await engine.close()

    asyncio.run(run())
