"""Prometheus metrics move as they should after real requests (parsed with prometheus-client's own parser)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMOL, RunningServer, start_server
from tests.samples import HELLO


def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{server.base_url}/metrics", headers=server.headers)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(server: RunningServer, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/chat/completions", json={"model": server.model, **body}, headers=server.headers, timeout=300
    )


def test_refinement_and_request_metrics_move(smol_server: RunningServer) -> None:
    model = smol_server.model
    before = scrape(smol_server)
    plain = chat(smol_server, messages=HELLO, max_tokens=8).json()
    refined = chat(smol_server, messages=HELLO, max_tokens=8, refine="adaptive", max_refine_iterations=3).json()
    assert (
        httpx.post(
            f"{smol_server.v1}/chat/completions", json={"model": "nope", "messages": HELLO}, headers=smol_server.headers
        ).status_code
        == 404
    )
    assert chat(smol_server, messages=[]).status_code == 400
    after = scrape(smol_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    iterations = refined["refinement"]["iterations"]
    reason = refined["refinement"]["stop_reason"]
    assert delta("toolace_refine_iterations_count", model=model, mode="adaptive") == 1
    assert delta("toolace_refine_iterations_sum", model=model, mode="adaptive") == iterations
    assert delta("toolace_refine_iterations_bucket", model=model, mode="none", le="0.0") == 1
    assert delta("toolace_refine_stops_total", model=model, mode="adaptive", reason=reason) == 1
    assert delta("toolace_refine_stops_total", model=model, mode="none", reason="none") == 1
    assert delta("toolace_requests_total", model=model, status="2xx") == 2
    assert delta("toolace_requests_total", model="unknown", status="4xx") == 2
    usage = [plain["usage"], refined["usage"]]
    assert delta("toolace_prompt_tokens_total", model=model) == sum(u["prompt_tokens"] for u in usage)
    assert delta("toolace_generation_tokens_total", model=model) == sum(u["completion_tokens"] for u in usage)
    assert delta("toolace_request_duration_seconds_count", model=model, mode="adaptive") == 1
    assert delta("toolace_time_to_first_token_seconds_count", model=model, mode="none") == 1
    accepted = refined["usage"]["completion_tokens_details"]["accepted_prediction_tokens"]
    assert delta("toolace_draft_tokens_total", model=model, result="accepted") == accepted
    assert value(after, "toolace_requests_in_flight") == 0


@pytest.fixture(scope="module")
def public_server(smol_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(SMOL, tmp_path_factory.mktemp("metrics-public"), "--metrics-public")


def test_metrics_need_the_api_key_unless_public(smol_server: RunningServer, public_server: RunningServer) -> None:
    assert httpx.get(f"{smol_server.base_url}/metrics").status_code == 401
    public = httpx.get(f"{public_server.base_url}/metrics")
    assert public.status_code == 200 and "toolace_requests_in_flight" in public.text
    assert httpx.get(f"{public_server.v1}/models").status_code == 401  # only /metrics opens up
