"""The shipped dashboard and alert rules: generated, valid, using only real metrics, and not empty
when a real Prometheus scrapes a real convray server under real traffic."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.service.metrics import SearchMetrics
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from convray.workers.progress import EpochProgress
from convray.workers.train import TrainConfig, train
from tests.conftest import REPO_ROOT
from tests.conftest import digit_png as png
from tests.deploy.tools import Scrape, prometheus_binary, scrape

GRAFANA = REPO_ROOT / "deploy" / "grafana"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = json.loads((GRAFANA / "convray-dashboard.json").read_text())
RULES = [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
PANEL_QUERIES = [(panel["title"], target["expr"]) for panel in PANELS for target in panel["targets"]]
CONVRAY_NAME = re.compile(r"\bconvray_[a-z0-9_]+")
FINAL_COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s*([0-9.]+)\s*$")


def test_the_committed_dashboard_json_is_what_dashboard_py_generates():
    generated = subprocess.run(
        [sys.executable, str(GRAFANA / "dashboard.py")], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert generated == (GRAFANA / "convray-dashboard.json").read_text(), (
        "regenerate: .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/convray-dashboard.json"
    )


def test_per_replica_panels_keep_each_front_ends_replicas_apart():
    """Every front end names its replicas digits-0, digits-1...: grouped without ``instance``, a panel summed
    unrelated actors of different front ends into one line (found in review)."""
    per_replica = [(title, expr) for title, expr in PANEL_QUERIES if "convray_replica_" in expr and " by (" in expr]
    assert per_replica
    for title, expr in per_replica:
        grouping = re.search(r" by \(([^)]*)\)", expr).group(1)
        assert "replica" not in grouping or "instance" in grouping, (title, expr)


def test_the_dashboard_reads_its_datasource_model_and_instance_from_template_variables():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["model"]["type"] == "query"
    assert all(panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for panel in PANELS)
    for title, expr in PANEL_QUERIES:
        if not title.startswith("Ray cluster"):  # a front end's own connection: no model label to filter
            assert 'model=~"$model"' in expr, title
        if not title.startswith("Training"):
            assert 'instance=~"$instance"' in expr, title
    assert DASHBOARD["schemaVersion"] >= 36
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_the_dashboard_covers_what_an_operator_needs():
    titles = " | ".join(panel["title"] for panel in PANELS).lower()
    for topic in [
        "requests per second", "error ratio by code", "latency", "time in queue", "batch size", "batch fill",
        "replicas and failures", "gpu memory", "overload rejections", "training progress", "ray cluster connection",
    ]:  # fmt: skip
        assert topic in titles
    latency = next(panel for panel in PANELS if panel["title"] == "Request latency")
    assert [target["legendFormat"] for target in latency["targets"]] == ["p50", "p90", "p99"]


def test_the_alert_rules_cover_errors_latency_replicas_overload_and_a_lost_ray():
    assert {rule["alert"] for rule in RULES} >= {
        "ConvrayHighErrorRatio", "ConvrayP99LatencyHigh", "ConvrayReplicasDown", "ConvraySustainedOverload",
        "ConvrayRayUnreachable",
    }  # fmt: skip
    assert all(
        rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"] for rule in RULES
    )


def test_promtool_accepts_the_rules_and_the_example_config():
    promtool = prometheus_binary("promtool")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_see_each_alert_fire_and_stay_quiet():
    promtool = prometheus_binary("promtool")
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in RULES}  # every alert is seen firing
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- against a real server and a real Prometheus ---------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    _, data = load_digits_split()
    return data.images


def drive_traffic(address: str, images: np.ndarray, seconds: float) -> None:
    """Real traffic on both APIs for ``seconds``: classifications, one bad image, and one overload."""
    with grpc.insecure_channel(address) as channel:
        native = classifier_pb2_grpc.ClassifierStub(channel)
        infer = oip_grpc.GRPCInferenceServiceStub(channel)
        batch = oip.ModelInferRequest(model_name="digits", raw_input_contents=[images[:8].astype("<f4").tobytes()])
        batch.inputs.add(name="input", datatype="FP32", shape=[8, 1, 8, 8])
        with pytest.raises(grpc.RpcError):
            native.Classify(pb.ClassifyRequest(image=b"not an image"), timeout=10)
        waiting = threading.Thread(target=lambda: infer.ModelInfer(batch, timeout=10))
        waiting.start()
        time.sleep(0.1)  # the batch of 8 fills the queue for 300 ms
        with pytest.raises(grpc.RpcError) as refused:
            native.Classify(pb.ClassifyRequest(image=png(images[0])), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        waiting.join(10)
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            futures = [
                native.Classify.future(pb.ClassifyRequest(image=png(images[i + j])), timeout=10) for j in range(4)
            ]
            [future.result() for future in futures]
            i = (i + 4) % 400


def search_metrics_endpoint() -> tuple[SearchMetrics, int, object]:
    """The gauges of `convray tune --metrics-port`, a superset of `convray train`'s, on a port of their own."""
    progress = SearchMetrics(CollectorRegistry(), "digits", trials=1, epochs=2)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=progress.registry)
    return progress, server.server_port, server


def test_every_metric_name_in_the_dashboard_and_rules_is_exported(metered, images):
    drive_traffic(metered.address, images, seconds=1)
    exported = scrape(metered.server.metrics_port).names()
    progress = SearchMetrics(CollectorRegistry(), "digits", trials=2, epochs=2)
    progress.trial_started(1)
    progress.epoch_finished(EpochProgress(1, 2, 0.5, 0.9, 1000.0), val_accuracy=0.9)
    exported |= Scrape(generate_latest(progress.registry).decode()).names()
    used = {name for _, expr in PANEL_QUERIES for name in CONVRAY_NAME.findall(expr)}
    used |= {name for rule in RULES for name in CONVRAY_NAME.findall(rule["expr"])}
    used |= {name for v in DASHBOARD["templating"]["list"] for name in CONVRAY_NAME.findall(str(v.get("query", "")))}
    assert used and used <= exported, sorted(used - exported)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """Debian's prometheus binary on 127.0.0.1, scraping the given targets every second."""

    def __init__(self, binary: str, workdir, targets: dict[str, int]) -> None:
        self.port = free_port()
        rules = (PROMETHEUS / "alerts.yml").read_text()
        (workdir / "alerts.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            if error.code == 503:  # still starting up: wait_until retries this like a port not yet open
                raise ConnectionError(f"prometheus not ready: {error.read().decode()}") from None
            raise AssertionError(f"{params}: {error.read().decode()}") from None  # a bad query: say which and why
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def wait_until(self, condition, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, "prometheus exited"
            try:
                if condition():
                    return
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "prometheus did not get there in time"
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def instantiate(expr: str, instance: str) -> str:
    """A dashboard query as Grafana sends it, with the template variables set to one front end and model."""
    return expr.replace("$instance", instance).replace("$model", "digits").replace("$__rate_interval", "30s")


def test_a_real_prometheus_scraping_a_real_server_fills_every_panel_and_evaluates_every_alert(
    metered, images, tmp_path
):
    binary = prometheus_binary("prometheus")
    progress, train_port, train_server = search_metrics_endpoint()
    convray_port = metered.server.metrics_port
    prometheus = PrometheusServer(binary, tmp_path, {"convray": convray_port, "convray-train": train_port})
    try:
        prometheus.wait_until(lambda: len(prometheus.query("up == 1")) == 2)
        drive_traffic(metered.address, images, seconds=3)
        progress.trial_started(1)  # a search of one trial, as `convray tune` would report it
        config = TrainConfig(epochs=2, threads=1, workers=0)
        train(config, log=lambda line: None, on_epoch=lambda epoch: progress.epoch_finished(epoch, val_accuracy=0.9))
        drive_traffic(metered.address, images, seconds=3)
        instance = f"127.0.0.1:{convray_port}"
        prometheus.wait_until(lambda: prometheus.query('convray_train_epoch{model="digits"} == 2'))

        empty = [(title, expr) for title, expr in PANEL_QUERIES if not prometheus.query(instantiate(expr, instance))]
        assert not empty, "panels with no data:\n" + "\n".join(f"{title}: {expr}" for title, expr in empty)

        for rule in RULES:
            expr = " ".join(rule["expr"].split())
            assert FINAL_COMPARISON.search(expr), rule["alert"]
            evaluated = FINAL_COMPARISON.sub(r" \1 bool \2", expr)  # the comparison, as 0 or 1 per series
            assert prometheus.query(evaluated), f"{rule['alert']}: {evaluated} returned no data"
        loaded = {r["name"]: r["health"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        assert loaded == {rule["alert"]: "ok" for rule in RULES}
    finally:
        prometheus.stop()
        train_server.shutdown()
        train_server.server_close()
