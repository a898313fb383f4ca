"""Shipped observability files refer only to metrics the job really exports."""

import json
import re
from pathlib import Path

import yaml

from actors.metrics import EXPORTED, RunMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "refocus-dashboard.json").read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\brefocus_[a-z0-9_]+", target["expr"]))
    return names


def _base_name(series: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in EXPORTED:
            return series.removesuffix(suffix)
    return series


def test_dashboard_queries_only_exported_metrics():
    used = {_base_name(n) for n in _dashboard_metric_names()}
    assert used, "dashboard has no refocus queries"
    assert used <= set(EXPORTED), sorted(used - set(EXPORTED))


def test_dashboard_shows_every_exported_metric_but_bad_rows():
    used = {_base_name(n) for n in _dashboard_metric_names()}
    missing = set(EXPORTED) - used - {"refocus_bad_rows_total", "refocus_generated_groups_total",
                                      "refocus_trained_groups_total", "refocus_learner_steps_total",
                                      "refocus_curriculum_transitions_total"}
    assert not missing, sorted(missing)


def test_exported_names_match_the_registry():
    """The constants are the names prometheus_client really exposes (counters gain _total)."""
    metrics = RunMetrics()
    registered = set()
    for collector in metrics.registry._collector_to_names:  # noqa: SLF001 - the registry's own index
        registered |= set(metrics.registry._collector_to_names[collector])
    for name in EXPORTED:
        assert name in registered, name


def test_prometheus_config_scrapes_the_job_and_ray_service_discovery():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["refocus"]["static_configs"][0]["targets"]
    files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert any(f.endswith("prom_metrics_service_discovery.json") for f in files)


def test_kuberay_manifest_and_cluster_launcher_parse():
    rayjob = yaml.safe_load((DEPLOY / "k8s" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and "refocus train" in rayjob["spec"]["entrypoint"]
    cluster = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert cluster["available_node_types"]["gpu_8x"]["resources"]["GPU"] == 8
