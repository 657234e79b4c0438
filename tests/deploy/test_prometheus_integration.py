"""A real Prometheus (Debian's package) scrapes the real server on 127.0.0.1 with the API key, as deploy/ configures it.

Its configuration is deploy/prometheus/prometheus.yml with only the target, the key file and the intervals changed,
so the shipped scrape job (path, Bearer authorization) is what gets exercised. Then the dashboard's queries run
against it.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RunningServer, _free_port, stopped_after
from tests.deploy.conftest import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    adaptive_request,
    dashboard_queries,
    find_tool,
    grafana_to_promql,
)

DEPTH_P50 = "histogram_quantile(0.5, sum by (le) (rate(toolace_refine_iterations_bucket[1m])))"
JOB = "toolace-r"
# Series that exist only after an event this test does not cause (a tool call the parser rejects).
EVENT_ONLY = ("toolace_tool_call_parse_failures_total",)


def local_config(server: RunningServer, key_file: Path) -> dict[str, Any]:
    """deploy's prometheus.yml, pointed at the test server, scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"deploy/prometheus/prometheus.yml must have one scrape job named {JOB}"
    job = jobs[0]
    assert job["authorization"]["type"] == "Bearer"
    job["authorization"]["credentials_file"] = str(key_file)
    job["static_configs"] = [{"targets": [server.base_url.removeprefix("http://")]}]
    config["scrape_configs"] = [job]  # the compose stack's self-scrape job has no Prometheus to reach here
    return config


class Prometheus:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url, self.log_path = url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}\n-> {response.text}"
        return body["data"]

    def target(self) -> dict[str, Any] | None:
        targets = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return next((t for t in targets if t["labels"].get("job") == JOB), None)


@pytest.fixture(scope="module")
def prometheus(smol_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary, promtool = find_tool("prometheus"), find_tool("promtool")
    work = tmp_path_factory.mktemp("prometheus")
    key_file = work / "api-key"
    key_file.write_text(smol_server.api_key + "\n")
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(local_config(smol_server, key_file)))
    # The full check (files included) of the shipped configuration, with the key file present this time.
    check = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    port = _free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log_path)
    with stopped_after(proc, f"{prom.url}/-/ready", "prometheus", prom.log, timeout=30, stop_timeout=15):
        yield prom


def wait_for_target_up(prom: Prometheus, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    target = None
    while time.monotonic() < deadline:
        target = prom.target()
        if target and target["health"] == "up":
            return
        time.sleep(0.3)
    pytest.fail(f"Prometheus never scraped the server successfully: {json.dumps(target, indent=1)}\n{prom.log()}")


@pytest.fixture(scope="module")
def scraped_traffic(prometheus: Prometheus, smol_server: RunningServer, metrics_after_adaptive: str) -> Prometheus:
    """A request between scrapes, so that rate(...[1m]) of the depth histogram has a value.

    The depth series exist since `metrics_after_adaptive`'s request; once Prometheus holds a sample of them, one
    more request is an increase that rate() sees (a series' first sample alone is not).
    """
    wait_for_target_up(prometheus)
    present = "toolace_refine_iterations_count{job='toolace-r', mode='adaptive'}"
    poll(prometheus, present, lambda result: bool(result))
    adaptive_request(smol_server)
    poll(prometheus, DEPTH_P50, lambda result: bool(result) and math.isfinite(float(result[0]["value"][1])))
    return prometheus


def poll(prom: Prometheus, promql: str, ok: Callable[[list[Any]], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = prom.query(promql)["result"]
        if ok(result):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{promql} -> {result} after {timeout} s\ntarget: {prom.target()}\n{prom.log()}")
        time.sleep(0.25)


def test_refine_depth_p50_from_prometheus(scraped_traffic: Prometheus) -> None:
    data = scraped_traffic.query(DEPTH_P50)
    assert data["resultType"] == "vector"
    [sample] = data["result"]
    p50 = float(sample["value"][1])
    assert math.isfinite(p50) and 0 <= p50 <= 10  # refine rounds: 0..max_refine_iterations (at most 10)


def test_scrape_needs_and_uses_the_api_key(scraped_traffic: Prometheus, smol_server: RunningServer) -> None:
    assert httpx.get(f"{smol_server.base_url}/metrics", timeout=10).status_code == 401  # the secure default
    target = scraped_traffic.target()
    assert target is not None and target["health"] == "up", target
    assert target["scrapeUrl"] == f"{smol_server.base_url}/metrics"


def test_every_dashboard_query_evaluates(scraped_traffic: Prometheus, smol_server: RunningServer) -> None:
    """Each panel query, with Grafana's variables filled in, parses and (but for event-only series) has data."""
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for title, expr in dashboard_queries(dashboard):
        data = scraped_traffic.query(grafana_to_promql(expr))
        if not data["result"] and not any(name in expr for name in EVENT_ONLY):
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data after real traffic:\n" + "\n".join(empty)

    # The template variables' label_values(...) find the served model and the refine modes.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        metric_selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        response = httpx.get(
            f"{scraped_traffic.url}/api/v1/label/{label}/values",
            params={"match[]": grafana_to_promql(metric_selector)},
            timeout=10,
        ).json()
        assert response["status"] == "success", response
        expected = smol_server.model if label == "model" else "adaptive"
        assert expected in response["data"], (variable["name"], response["data"])
