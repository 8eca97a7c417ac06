"""integrations/observability: the example app's OpenTelemetry metrics in a real Prometheus, queried by the kit.

The smoke test starts ``integrations/observability/app.py`` under uvicorn, drives a few hundred users through it,
starts a real Prometheus (from PATH) that scrapes its ``/metrics`` every second with ``prometheus-rules.yml``
loaded, and evaluates every recording rule, alert rule and Grafana panel query through the HTTP API. Without a
``prometheus`` binary those tests skip, or fail when ``$CI`` is set (``.ci/run`` installs it with apt-get).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from canary_router import bucket
from webserver import ROOT, free_port, python_module, serve

KIT = ROOT / "integrations" / "observability"
RULES = KIT / "prometheus-rules.yml"
DASHBOARD = KIT / "grafana-dashboard.json"
COLLECTOR = KIT / "otel-collector.yaml"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ROLLOUT = "recommender"
USERS = [f"u{i}" for i in range(300)]
VARIANTS = {"old", "new"}
RATE_INTERVAL = "15s"
DASHBOARD_VARIABLES = {"rollout": ROLLOUT, "__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": "1m"}
"""Concrete values for the dashboard's variables (Grafana would fill them in; 15 s spans 15 one-second scrapes)."""
RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
"""A recorded series name (level:metric:operations) inside an expression."""


def rules() -> list[dict[str, Any]]:
    """Every rule of prometheus-rules.yml, each with its group's name under ``group``."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [{**rule, "group": group["name"]} for group in groups for rule in group["rules"]]


def panel_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def substitute(expr: str) -> str:
    """The expression with the dashboard's variables (``$name`` or ``${name}``) replaced by concrete values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in DASHBOARD_VARIABLES, f"no test value for dashboard variable ${name}"
        return DASHBOARD_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def tool(name: str) -> str:
    """The path of ``name`` on PATH; fails in CI, skips elsewhere when it is missing."""
    found = shutil.which(name)
    if found is None:
        if IN_CI:
            pytest.fail(f"{name} is not on PATH: .ci/run installs Debian's 'prometheus' package (apt-get) first")
        pytest.skip(f"{name} is not on PATH (Debian: apt-get install prometheus); with CI=true this test fails")
    return found


@dataclass
class Stack:
    """The running example app and the Prometheus that scrapes it."""

    app: str
    prometheus: str
    served: dict[str, str]
    """User id -> the variant the app served on the first pass."""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now through /api/v1/query; assert Prometheus accepted it and return the vector."""
        response = httpx.post(f"{self.prometheus}/api/v1/query", data={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200, f"{expr}\n-> {body}"
        assert body["status"] == "success", f"{expr}\n-> {body}"
        assert body["data"]["resultType"] == "vector", expr
        return list(body["data"]["result"])

    def api(self, path: str, **params: Any) -> Any:
        """The ``data`` of a successful GET on the Prometheus HTTP API."""
        body = httpx.get(f"{self.prometheus}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]


def variants(result: list[dict[str, Any]]) -> list[str]:
    """The feature_flag_result_variant of each series of a query result (sorted; "" when a series has none)."""
    return sorted(series["metric"].get("feature_flag_result_variant", "") for series in result)


def assert_per_variant(result: list[dict[str, Any]], what: str) -> None:
    """Assert exactly one series per variant, old and new, each with a finite value."""
    assert variants(result) == ["new", "old"], f"{what}: expected one series per variant, got {result}"
    for series in result:
        assert math.isfinite(float(series["value"][1])), f"{what}: {series}"


@contextmanager
def prometheus(binary: str, tmp: Path, target: str) -> Iterator[str]:
    """Run Prometheus scraping ``target`` every second with the rules loaded; yield its base URL, then stop it."""
    port = free_port()
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "recommender-example", "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config), encoding="utf-8")
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus was not ready within 30 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait()


@contextmanager
def traffic(base: str) -> Iterator[dict[str, str]]:
    """Send every user once (yielding what each was served), and keep cycling through them until the block ends."""
    served: dict[str, str] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def visit(client: httpx.Client, uid: str) -> str:
        """One request as ``uid``: the variant served ("new" also for the engine's deliberate 503)."""
        response = client.get("/recommendations", headers={"x-user-id": uid})
        if response.status_code == 503:
            return "new"
        assert response.status_code == 200, response.text
        return str(response.json()["variant"])

    def keep_going() -> None:
        """Cycle through the users until told to stop; keep the first failure for the main thread."""
        try:
            with httpx.Client(base_url=base, timeout=10) as client:
                while not stop.is_set():
                    for uid in USERS:
                        if stop.is_set():
                            break
                        visit(client, uid)
        except BaseException as exc:  # re-raised by the main thread
            failures.append(exc)

    with httpx.Client(base_url=base, timeout=10) as client:
        for uid in USERS:
            served[uid] = visit(client, uid)
    worker = threading.Thread(target=keep_going, daemon=True)
    worker.start()
    try:
        yield served
    finally:
        stop.set()
        worker.join(timeout=15)
    if failures:
        raise failures[0]


def wait_for(stack: Stack, expr: str, ready: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> None:
    """Poll ``expr`` until ``ready(result)``; fail with the last result after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = stack.query(expr)
        if ready(result):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{expr} was not ready within {timeout} s: {result}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The example app under uvicorn, scraped every second by a Prometheus with the rules, under steady traffic."""
    binary = tool("prometheus")
    port = free_port()
    command = python_module("uvicorn", "app:app", "--port", str(port), "--no-access-log", "--log-level", "warning")
    tmp = tmp_path_factory.mktemp("prometheus")
    with (
        serve(command, port, cwd=KIT) as app,
        prometheus(binary, tmp, f"127.0.0.1:{port}") as prom,
        traffic(app) as served,
    ):
        running = Stack(app=app, prometheus=prom, served=served)
        # Two scrapes with failures of "new" in them, and every recording rule evaluated over them.
        wait_for(running, 'rate(canary_router_invocation_duration_seconds_count{error_type!=""}[15s]) > 0', bool)
        for name in sorted({rule["record"] for rule in rules() if "record" in rule}):
            per_variant = name.startswith("rollout_variant:")
            wait_for(
                running, name, lambda result, p=per_variant: (variants(result) == ["new", "old"]) if p else bool(result)
            )
        yield running


def test_metric_names_as_stored_by_prometheus(stack: Stack) -> None:
    """Prometheus stores canary_router_decisions_total and canary_router_invocation_duration_seconds_*, labelled."""
    names = set(stack.api("label/__name__/values"))
    expected = {
        "canary_router_decisions_total",
        "canary_router_invocation_duration_seconds_bucket",
        "canary_router_invocation_duration_seconds_count",
        "canary_router_invocation_duration_seconds_sum",
    }
    assert expected <= names, sorted(n for n in names if n.startswith("canary"))
    assert not {n for n in names if "canary_router" in n and "." in n}
    decisions = stack.api("series", **{"match[]": "canary_router_decisions_total"})
    assert {s["feature_flag_result_variant"] for s in decisions} == VARIANTS
    assert {s["feature_flag_key"] for s in decisions} == {ROLLOUT}
    assert {s["feature_flag_result_reason"] for s in decisions} == {"split"}
    durations = stack.api("series", **{"match[]": "canary_router_invocation_duration_seconds_count"})
    failed = [s for s in durations if "error_type" in s]
    assert {s["error_type"] for s in failed} == {"app.RecommenderUnavailable"}
    assert {s["feature_flag_result_variant"] for s in failed} == {"new"}
    # The dashboard's $rollout variable: label_values(canary_router_decisions_total, feature_flag_key).
    keys = stack.api("label/feature_flag_key/values", **{"match[]": "canary_router_decisions_total"})
    assert keys == [ROLLOUT]


def test_rules_load_and_evaluate_without_error(stack: Stack) -> None:
    """Prometheus loaded every rule of the file, and each one's last evaluation succeeded."""
    loaded = [rule for group in stack.api("rules")["groups"] for rule in group["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r.get("record") or r["alert"] for r in rules())
    for rule in loaded:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule


def test_every_recording_rule_returns_both_variants(stack: Stack) -> None:
    """Each recording rule's expression, and its recorded series, give one finite series per variant."""
    checked = 0
    for rule in rules():
        if "record" not in rule:
            continue
        if rule["record"].startswith("rollout_variant:"):
            assert_per_variant(stack.query(rule["expr"]), rule["record"])
            assert_per_variant(stack.query(f'{rule["record"]}{{feature_flag_key="{ROLLOUT}"}}'), rule["record"])
        else:  # the declared steps: one constant per rule, labelled by the rule
            assert len(stack.query(rule["expr"])) == 1, rule["expr"]
            recorded = stack.query(f'{rule["record"]}{{step="{rule["labels"]["step"]}"}}')
            assert [s["metric"]["feature_flag_key"] for s in recorded] == [ROLLOUT]
        checked += 1
    assert checked >= 7


def test_every_alert_expression_is_accepted_over_existing_series(stack: Stack) -> None:
    """Each alert expression runs (0 or 1 series per rollout), and every recorded series it compares exists."""
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} == {
        "CanaryNewVersionErrorRateHigher",
        "CanaryNewVersionSlower",
        "CanaryTrafficShareOffStep",
    }
    for alert in alerts:
        result = stack.query(alert["expr"])
        assert len(result) <= 1, (alert["alert"], result)
        assert all(s["metric"].get("feature_flag_key") == ROLLOUT for s in result), result
        used = set(RECORDED.findall(alert["expr"]))
        assert used, alert["alert"]
        for name in used:
            if name.startswith("rollout_variant:"):
                assert_per_variant(stack.query(f'{name}{{feature_flag_key="{ROLLOUT}"}}'), f"{alert['alert']}: {name}")
            else:
                assert stack.query(name), f"{alert['alert']}: {name} has no series"


def test_every_dashboard_query_returns_its_series(stack: Stack) -> None:
    """Each Grafana panel query, variables filled in, gives one finite series per variant (the step panel: one)."""
    targets = panel_targets()
    assert len(targets) >= 5
    for title, target in targets:
        result = stack.query(substitute(target["expr"]))
        if "feature_flag_result_variant" in target.get("legendFormat", ""):
            assert_per_variant(result, title)
        else:
            assert len(result) == 1, (title, result)
            assert math.isfinite(float(result[0]["value"][1])), (title, result)


def test_values_match_what_the_app_did(stack: Stack) -> None:
    """The share of new matches the users' buckets at 50 %, new fails 1 call in 20 and old never, both are timed."""
    assert stack.served == {u: "new" if bucket(ROLLOUT, u) < 5000 else "old" for u in USERS}
    expected_share = sum(v == "new" for v in stack.served.values()) / len(USERS)

    def by_variant(expr: str) -> dict[str, float]:
        """Variant -> value of each series ``expr`` gives."""
        return {s["metric"]["feature_flag_result_variant"]: float(s["value"][1]) for s in stack.query(expr)}

    share = by_variant("rollout_variant:canary_router_decision_share:ratio_rate5m")
    assert share["new"] == pytest.approx(expected_share, abs=0.05)
    assert share["old"] + share["new"] == pytest.approx(1.0)
    errors = by_variant("rollout_variant:canary_router_invocation_error_ratio:rate5m")
    assert errors["old"] == 0
    assert errors["new"] == pytest.approx(0.05, abs=0.02)
    p95 = by_variant("rollout_variant:canary_router_invocation_duration_seconds:p95_rate5m")
    assert 0 < p95["old"] <= 0.1
    assert 0 < p95["new"] <= 0.1
    step = stack.query(substitute(next(t["expr"] for title, t in panel_targets() if title.startswith("Current step"))))
    assert float(step[0]["value"][1]) == pytest.approx(100 * expected_share, abs=5)


def test_error_alert_goes_pending_and_share_alert_stays_quiet(stack: Stack) -> None:
    """New fails 5 % of calls against 0 % for old, so the error alert is pending; the 50 % share matches a step."""
    deadline = time.monotonic() + 15
    while True:
        active = {alert["labels"]["alertname"]: alert for alert in stack.api("alerts")["alerts"]}
        if "CanaryNewVersionErrorRateHigher" in active or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    error = active.get("CanaryNewVersionErrorRateHigher")
    assert error is not None, active
    assert error["state"] in ("pending", "firing")
    assert error["labels"]["feature_flag_key"] == ROLLOUT
    assert error["labels"]["severity"] == "critical"
    assert float(error["value"]) == pytest.approx(0.05, abs=0.02)
    assert "CanaryTrafficShareOffStep" not in active


def test_rules_pass_promtool() -> None:
    """``promtool check rules`` accepts prometheus-rules.yml."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_config_wires_otlp_to_prometheus() -> None:
    """The collector config parses, receives OTLP, exports to Prometheus, and every pipeline component is defined."""
    config = yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert "prometheus" in pipeline["exporters"]
    assert config["exporters"]["prometheus"]["endpoint"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline.get(kind, []):
            assert name in config[kind], f"{kind}: {name} is used but not defined"
    for name in config["service"].get("extensions", []):
        assert name in config["extensions"]


def test_dashboard_has_the_panels_and_a_datasource_variable() -> None:
    """The dashboard is valid JSON with a datasource variable that every panel and target uses, and the four views."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["rollout"]["type"] == "query"
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("Error rate by variant", "p95 latency by variant", "Traffic share by variant", "Current step"):
        assert any(t.startswith(wanted) for t in titles), (wanted, titles)
    step = next(p for p in dashboard["panels"] if p["title"].startswith("Current step"))
    assert "derived" in step["description"].lower()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert '$rollout"' in target["expr"], panel["title"]


def test_readme_gives_one_command_that_runs_this_test() -> None:
    """The kit's README shows exactly one shell command, and it runs this smoke test."""
    text = (KIT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in text.split("```")[1::2] if b.startswith(("bash", "sh", "console"))]
    assert len(blocks) == 1
    assert "pytest" in blocks[0]
    assert "tests/test_observability.py" in blocks[0]
