"""The fast refinement path through the real server: on by default for greedy requests, off for sampled ones, and
giving exactly the answers of the plain loop on real prompts (BFCL questions with their functions as tools)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.bench.bfcl_tools import load
from tests.conftest import SMOL, RunningServer, start_server
from tests.samples import HELLO


# float32 for the comparison: the fast path is exact in arithmetic, but in bf16 a prompt prefilled in two parts (a
# cached prefix, then the rest) rounds differently from one prefilled at once, and SmolLM2 has near-ties to flip.
@pytest.fixture(scope="module")
def plain_server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(
        SMOL,
        tmp_path_factory.mktemp("plain"),
        "--prefix-cache-tokens",
        "0",
        "--no-draft-refinement",
        "--dtype",
        "float32",
    )


@pytest.fixture(scope="module")
def fast_server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(SMOL, tmp_path_factory.mktemp("fast"), "--dtype", "float32")


def chat(server: RunningServer, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": server.model, "return_refinement_history": True, **body},
        headers=server.headers,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_refinement_uses_the_fast_path_by_default(smol_server: RunningServer) -> None:
    data = chat(smol_server, messages=HELLO, max_tokens=16, refine="adaptive")
    answers, usage = data["refinement"]["answers"], data["usage"]
    assert answers[1] == answers[0], "SmolLM2 repeats its greeting when asked to refine it"
    # round 1 re-read round 0's prompt from the prefix cache and verified round 0's answer in one pass
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    assert usage["completion_tokens_details"]["rejected_prediction_tokens"] == 0


def test_sampled_refinement_decodes_plainly(smol_server: RunningServer) -> None:
    data = chat(
        smol_server, messages=HELLO, max_tokens=16, refine="vanilla", max_refine_iterations=2, temperature=0.8, seed=5
    )
    details = data["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == details["rejected_prediction_tokens"] == 0


def test_fast_path_gives_the_plain_loops_answers(fast_server: RunningServer, plain_server: RunningServer) -> None:
    questions = load("simple_python", 20)

    def histories(server: RunningServer) -> tuple[list[list[str]], tuple[int, int]]:
        """The refinement histories, and the cached prompt and accepted draft tokens over all of them."""
        replies = [
            chat(
                server,
                messages=q["messages"],
                tools=q["tools"],
                max_tokens=24,
                refine="adaptive",
                max_refine_iterations=3,
            )
            for q in questions
        ]
        cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies)
        accepted = sum(r["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] for r in replies)
        return [r["refinement"]["answers"] for r in replies], (cached, accepted)

    with ThreadPoolExecutor(2) as pool:  # each server answers one request at a time; the two run side by side
        (fast, fast_work), (plain, plain_work) = pool.map(histories, (fast_server, plain_server))
    assert fast == plain
    # and the fast server did take its fast path on these prompts: prefixes from its cache, drafts accepted
    assert all(n > 0 for n in fast_work) and plain_work == (0, 0), (fast_work, plain_work)
    assert sum(len(h) for h in fast) > len(questions)  # refine rounds did run
