"""k8s/grafana/splitserve-dashboard.json: well-formed panels, and every series it queries is one the code exports.

The exported names come from the real registries (the router's RouterMetrics and a prefill node's NodeMetrics over
a tiny model's engine), so renaming a metric in the code without updating the dashboard fails here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cluster.machines import load_catalog
from cluster.node.metrics import NodeIdentity, NodeMetrics
from cluster.power.telemetry import ModeledPowerMeter, UtilisationWindow
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.tiny_model import make_tiny_model
from router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "splitserve-dashboard.json"
METRIC_NAME = re.compile(r"splitserve:[a-z0-9_]+")
VARIABLE = re.compile(r"\$(\w+)")
GRID_COLUMNS = 24
# Prometheus's series names per family type: what a PromQL expression may name.
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def exported_series(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Series names the router and a prefill node export (a prefill node exports every node metric)."""
    model = make_tiny_model(tmp_path_factory.mktemp("grafana") / "llama", arch="llama")
    engine = AsyncEngine(LLMEngine(model, EngineConfig(num_kv_blocks=16)))
    try:
        meter = ModeledPowerMeter(load_catalog()["cpu"], UtilisationWindow())
        node = NodeMetrics(NodeIdentity("prefill", "p0", "cpu"), engine, meter)
        return set(_series_names(RouterMetrics().registry)) | set(_series_names(node.registry))
    finally:
        engine.shutdown()


def _series_names(registry: CollectorRegistry) -> Iterator[str]:
    for family in registry.collect():
        for suffix in SERIES_SUFFIXES.get(family.type, ("",)):
            yield family.name + suffix


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' children included (a collapsed row keeps its panels inside it)."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]


def test_panels_have_unique_ids_and_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                assert (row, column) not in cells, f"{panel['title']} overlaps {cells[(row, column)]}"
                cells[(row, column)] = panel["title"]


def test_queries_use_the_datasource_input_and_defined_variables(dashboard: dict[str, Any]) -> None:
    assert [entry["name"] for entry in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"model", "role", "node", "machine_type"} <= variables
    builtins = {"__rate_interval", "__interval", "__range"}
    queries = _exprs(dashboard) + [variable["query"]["query"] for variable in dashboard["templating"]["list"]]
    for query in queries:
        undefined = set(VARIABLE.findall(query)) - variables - builtins
        assert not undefined, f"{query} uses undefined variables {undefined}"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], f"{panel['title']} queries nothing"


def test_every_queried_series_is_exported(dashboard: dict[str, Any], exported_series: set[str]) -> None:
    queries = _exprs(dashboard) + [variable["query"]["query"] for variable in dashboard["templating"]["list"]]
    queried = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert queried, "the dashboard queries no splitserve metric"
    assert queried <= exported_series, f"not exported: {sorted(queried - exported_series)}"


def test_quantiles_are_taken_over_histogram_buckets_by_le(dashboard: dict[str, Any]) -> None:
    quantile_exprs = [expr for expr in _exprs(dashboard) if "histogram_quantile" in expr]
    assert quantile_exprs
    for expr in quantile_exprs:
        assert re.search(r"by \(le\b", expr) and "_bucket{" in expr, expr
