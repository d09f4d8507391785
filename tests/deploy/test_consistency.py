"""deploy/k8s agrees with the code: settings, ports, probes, image, metric names and the training command."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from convray.service.cli import SERVE_FLAGS, build_parser
from convray.service.config import Settings
from convray.service.metrics import Metrics, SearchMetrics, TrainingMetrics
from convray.service.server import CLASSIFIER_SERVICE, LIVENESS_SERVICE
from convray.workers.repository import ModelRepository
from tests.conftest import REPO_ROOT, SHIPPED_MODELS
from tests.deploy.conftest import BUILDS, DOCKERFILE, K8S, find

pytestmark = pytest.mark.deploy
SERVING = ["cpu", "gpu"]
ENV_FILE = K8S / "base" / "convray.env"


def settings_env(objects: list[dict]) -> dict[str, str]:
    return find(objects, "ConfigMap", "convray-settings")["data"]


def settings_from_configmap(objects: list[dict], monkeypatch) -> Settings:
    """convray's own Settings, read from exactly the ConfigMap's environment (as the pod gets it)."""
    for key in [k for k in os.environ if k.startswith("CONVRAY_")]:
        monkeypatch.delenv(key)
    for key, value in settings_env(objects).items():
        monkeypatch.setenv(key, value)
    return Settings()


def frontend(objects: list[dict]) -> dict:
    return find(objects, "Deployment", "convray-frontend")["spec"]["template"]["spec"]


def containers_of(obj: dict) -> list[dict]:
    """Every container and init container anywhere in an object (pod templates nest differently per kind)."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(obj)
    return found


def env_names() -> list[str]:
    return [f"CONVRAY_{group.upper()}__{field.upper()}" for group, field in SERVE_FLAGS.values()]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"ARG {name} not in {DOCKERFILE}"
    return match.group(1)


@pytest.mark.parametrize("overlay", SERVING)
def test_every_configmap_key_is_a_setting_and_convray_accepts_the_values(built, overlay, monkeypatch):
    env = settings_env(built[overlay])
    unknown = set(env) - set(env_names())
    assert not unknown, f"not convray settings: {sorted(unknown)}"
    settings = settings_from_configmap(built[overlay], monkeypatch)  # raises if a value is invalid
    assert settings.server.host == "0.0.0.0" and settings.server.metrics_host == "0.0.0.0"
    assert settings.workers.ray_address


def test_the_env_file_names_every_setting_set_or_commented_with_a_reason():
    text = ENV_FILE.read_text()
    for name in env_names():
        assert re.search(rf"^(# )?{name}[= ]", text, re.MULTILINE), f"{name} missing from {ENV_FILE}"


@pytest.mark.parametrize("overlay", SERVING)
def test_ports_services_and_servicemonitor_agree_with_the_settings(built, overlay, monkeypatch):
    objects = built[overlay]
    defaults, settings = Settings(), settings_from_configmap(objects, monkeypatch)
    assert settings.server.port == defaults.server.port
    assert settings.server.metrics_port == defaults.server.metrics_port
    container = next(c for c in frontend(objects)["containers"] if c["name"] == "convray")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {
        "grpc": settings.server.port,
        "health": settings.server.health_port,
        "rest": settings.server.http_port,
        "metrics": settings.server.metrics_port,
    }
    assert ports == expected

    grpc_service = find(objects, "Service", "convray-grpc")["spec"]
    headless_service = find(objects, "Service", "convray-frontend-pods")["spec"]
    assert headless_service["clusterIP"] == "None"  # DNS gives the pods: clients can balance per request
    for service in (grpc_service, headless_service):
        (grpc_port,) = service["ports"]
        assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"] in ("kubernetes.io/h2c", "grpc")
        assert grpc_port["targetPort"] in ("grpc", settings.server.port)

    (rest_port,) = find(objects, "Service", "convray-rest")["spec"]["ports"]
    assert rest_port["targetPort"] in ("rest", settings.server.http_port) and rest_port["appProtocol"] == "http"

    metrics_service = find(objects, "Service", "convray-metrics")
    (metrics_port,) = metrics_service["spec"]["ports"]
    assert metrics_port["targetPort"] in ("metrics", settings.server.metrics_port)
    monitor = find(objects, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [metrics_port["name"]]
    pod_labels = find(objects, "Deployment", "convray-frontend")["spec"]["template"]["metadata"]["labels"]
    for service in (grpc_service, headless_service, metrics_service["spec"]):
        assert service["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", SERVING)
def test_probes_use_grpc_health_on_a_service_the_server_reports(built, overlay, monkeypatch):
    settings = settings_from_configmap(built[overlay], monkeypatch)
    container = next(c for c in frontend(built[overlay])["containers"] if c["name"] == "convray")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == settings.server.health_port, probe  # plaintext: the kubelet's probes cannot do TLS
        expected = (LIVENESS_SERVICE,) if probe == "livenessProbe" else ("", CLASSIFIER_SERVICE)
        assert grpc.get("service", "") in expected, probe


@pytest.mark.parametrize("overlay", SERVING)
def test_the_startup_probe_outlasts_the_servers_own_start_limits(built, overlay, monkeypatch):
    """Killed by the probe first, a pod restarts with no word of why; past its own limits the server says why."""
    settings = settings_from_configmap(built[overlay], monkeypatch)
    probe = next(c for c in frontend(built[overlay])["containers"] if c["name"] == "convray")["startupProbe"]
    allowed_s = probe["periodSeconds"] * probe["failureThreshold"]
    assert allowed_s >= settings.workers.ray_connect_timeout_s + settings.workers.replica_start_timeout_s + 60


@pytest.mark.parametrize("overlay", SERVING)
def test_the_autoscaler_alone_sets_how_many_front_ends_run(built, overlay):
    """With replicas in the Deployment too, each `kubectl apply` (a settings change) reset an autoscaled set to it."""
    deployment = find(built[overlay], "Deployment", "convray-frontend")
    hpa = find(built[overlay], "HorizontalPodAutoscaler", "convray-frontend")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "convray-frontend"
    assert "replicas" not in deployment["spec"] and hpa["spec"]["minReplicas"] >= 2


@pytest.mark.parametrize("overlay", SERVING)
def test_one_slow_health_answer_under_load_does_not_take_a_pod_out_of_the_service(built, overlay):
    probe = next(c for c in frontend(built[overlay])["containers"] if c["name"] == "convray")["readinessProbe"]
    assert probe.get("timeoutSeconds", 1) >= 2 and probe.get("failureThreshold", 3) >= 2
    # A pod that stays unready still leaves soon: the last probe starts a period after the one before, then times out.
    assert probe["periodSeconds"] * probe["failureThreshold"] + probe["timeoutSeconds"] <= 15


@pytest.mark.parametrize("overlay", SERVING)
def test_the_most_front_ends_the_autoscaler_allows_fit_their_replicas_on_the_ray_workers(built, overlay, monkeypatch):
    """Each front end starts its own replicas (one model here), the rolling update adds one front end for a while,
    and every replica needs its CPUs and GPUs on a Ray worker: more front ends than fit never become Ready. A
    version switch starts the new version's replicas before it stops the old ones, so it needs twice as many:
    without room for them, a new version is never served at full scale (its load times out)."""
    settings = settings_from_configmap(built[overlay], monkeypatch)
    hpa = find(built[overlay], "HorizontalPodAutoscaler", "convray-frontend")["spec"]
    surge = find(built[overlay], "Deployment", "convray-frontend")["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    (group,) = find(built[overlay], "RayCluster", "convray")["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    front_ends, replicas = hpa["maxReplicas"] + surge, 2 * settings.workers.replicas  # old and new version
    assert front_ends * replicas * settings.workers.cpus_per_replica <= group["maxReplicas"] * float(limits["cpu"])
    gpus = float(limits.get("nvidia.com/gpu", 0))
    assert front_ends * replicas * settings.workers.gpus_per_replica <= group["maxReplicas"] * gpus


@pytest.mark.parametrize("overlay", SERVING)
def test_termination_grace_outlasts_the_prestop_sleep_and_the_drain(built, overlay, monkeypatch):
    settings = settings_from_configmap(built[overlay], monkeypatch)
    pod = frontend(built[overlay])
    container = next(c for c in pod["containers"] if c["name"] == "convray")
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + settings.server.drain_grace_s + 10


@pytest.mark.parametrize("overlay", SERVING)
def test_the_frontend_joins_the_ray_head_service_of_the_raycluster(built, overlay, monkeypatch):
    settings = settings_from_configmap(built[overlay], monkeypatch)
    cluster = find(built[overlay], "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    # KubeRay names the head Service <RayCluster name>-head-svc.
    assert settings.workers.ray_address == f"{cluster['metadata']['name']}-head-svc:{gcs_port}"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector of matchLabels only selects pods with ``labels``."""
    assert set(selector) <= {"matchLabels"}, "only matchLabels is read here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


RAY_AUTH_SECRET = {"name": "convray-ray-auth", "key": "auth_token"}  # KubeRay reads the token from this key


def ray_auth_env(container: dict) -> dict[str, object]:
    """A container's RAY_AUTH_* variables: a value, or the Secret key a value comes from."""
    return {
        e["name"]: e.get("value", e.get("valueFrom", {}).get("secretKeyRef"))
        for e in container.get("env", [])
        if e["name"].startswith("RAY_AUTH")
    }


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_the_ray_token_auth_component_gives_every_ray_cluster_and_front_end_the_same_token(built, build):
    """Opt-in: without it nothing asks for a token; with it, the clusters (KubeRay sets the token on their pods)
    and the front ends, which join the serving cluster as Ray nodes and drivers, all use one Secret's key."""
    plain, secured = built[build], built[f"{build}+ray-token-auth"]
    clusters = [o["spec"] for o in secured if o["kind"] == "RayCluster"]
    clusters += [o["spec"]["rayClusterSpec"] for o in secured if o["kind"] == "RayJob"]
    assert clusters
    for spec in clusters:
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET["name"]}
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52)  # token auth's first Ray
    for kind in ("RayCluster", "RayJob"):  # nothing else changed in them: without authOptions, the plain ones
        of_kind = [copy.deepcopy(o) for o in secured if o["kind"] == kind]
        for obj, plain_obj in zip(of_kind, [o for o in plain if o["kind"] == kind], strict=True):
            spec = obj["spec"]["rayClusterSpec"] if kind == "RayJob" else obj["spec"]
            del spec["authOptions"]
            assert obj == plain_obj
    front_ends = [o for o in secured if o["kind"] == "Deployment"]
    assert len(front_ends) == (0 if build == "train" else 1)
    for deployment in map(copy.deepcopy, front_ends):  # the builds are shared by every test: changed on a copy
        (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "convray"]
        assert ray_auth_env(container) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_AUTH_SECRET}
        # Nothing else changed: without the two variables it is the plain build's Deployment.
        container["env"] = [e for e in container["env"] if not e["name"].startswith("RAY_AUTH")]
        if not container["env"]:
            del container["env"]
        assert deployment == find(plain, "Deployment", "convray-frontend")
    for obj in plain:
        assert "authOptions" not in str(obj) and "RAY_AUTH" not in str(obj)
    patched = {"Deployment", "RayCluster", "RayJob"}
    assert [o for o in plain if o["kind"] not in patched] == [o for o in secured if o["kind"] not in patched]


@pytest.mark.parametrize("overlay", SERVING)
def test_only_the_front_ends_the_ray_pods_and_the_metrics_port_reach_the_ray_cluster(built, overlay):
    """Found in review: any pod in any namespace could submit a job to the Ray dashboard and run code next to the
    replicas. KubeRay labels every pod of a RayCluster ray.io/cluster=<its name>."""
    cluster = find(built[overlay], "RayCluster")
    ray_pod = {"ray.io/cluster": cluster["metadata"]["name"]}
    front_end = find(built[overlay], "Deployment", "convray-frontend")["spec"]["template"]["metadata"]["labels"]
    policy = find(built[overlay], "NetworkPolicy", "convray-ray")["spec"]
    assert selects(policy["podSelector"], ray_pod) and policy["policyTypes"] == ["Ingress"]
    (anywhere_in_app, metrics_only) = policy["ingress"]
    assert "ports" not in anywhere_in_app  # Ray uses many ports, some chosen at random
    peers = anywhere_in_app["from"]
    assert any(selects(peer["podSelector"], ray_pod) for peer in peers)
    assert any(selects(peer["podSelector"], front_end) for peer in peers)
    assert all(set(peer) == {"podSelector"} for peer in peers)  # this namespace only
    assert metrics_only["from"] == [{"namespaceSelector": {}}]
    (port,) = metrics_only["ports"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    for container in (head, *workers):  # the port named there, which the PodMonitor scrapes
        assert port["port"] in {p["name"] for p in container["ports"]}
    assert frontend(built[overlay])["automountServiceAccountToken"] is False  # it never calls the Kubernetes API
    monitor = find(built[overlay], "PodMonitor", "convray-ray")["spec"]
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == [port["port"]]


@pytest.mark.parametrize("overlay", SERVING)
def test_frontend_and_workers_see_the_model_repository_at_the_configured_path(built, overlay, monkeypatch):
    repo = settings_from_configmap(built[overlay], monkeypatch).models.model_repo.as_posix()
    assert repo.startswith("/"), "replicas resolve the path on other pods: it must be absolute"
    pvc = find(built[overlay], "PersistentVolumeClaim", "convray-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = find(built[overlay], "RayCluster")
    pods = [frontend(built[overlay])] + [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repo)
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"] and mount.get("readOnly") is True


def test_gpu_overlay_puts_replicas_on_gpus(built, monkeypatch):
    settings = settings_from_configmap(built["gpu"], monkeypatch)
    assert settings.workers.gpus_per_replica > 0 and settings.workers.device == "cuda"
    (group,) = find(built["gpu"], "RayCluster")["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    (cpu_group,) = find(built["cpu"], "RayCluster")["spec"]["workerGroupSpecs"]
    assert "nvidia.com/gpu" not in str(cpu_group)


def test_the_image_is_named_once_per_flavour_and_matches_the_version_and_dockerfile_targets(built):
    version = re.search(r'^version = "(.+)"$', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    expected = {"cpu": f"convray:{version}-cpu", "gpu": f"convray:{version}-cuda", "train": f"convray:{version}-cpu"}
    for name, objects in built.items():
        images = {c["image"] for obj in objects for c in containers_of(obj)}
        assert images == {expected[name.split("+")[0]]}, name  # a component on top keeps its build's image
    for target in ("cpu", "cuda"):
        assert re.search(rf"^FROM \S+ AS {target}$", DOCKERFILE.read_text(), re.MULTILINE), target
    # Manifests name the bare image; only the components set the tag.
    tagged = [p for p in K8S.rglob("*.yaml") if re.search(r"newTag:|image: convray:", p.read_text())]
    assert sorted(p.parent.name for p in tagged) == ["image-cpu", "image-cuda"]


def test_ray_version_in_the_manifests_is_the_one_the_image_installs(built):
    ray_version = dockerfile_arg("RAY_VERSION")
    assert find(built["cpu"], "RayCluster")["spec"]["rayVersion"] == ray_version
    assert find(built["train"], "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_the_rayjob_runs_a_real_convray_train_command_into_the_shared_repository(built, monkeypatch):
    job = find(built["train"], "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "convray"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train"
    repo = settings_from_configmap(built["cpu"], monkeypatch).models.model_repo.as_posix()
    assert args.model_repo == repo
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == repo)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert not mount.get("readOnly") and volume["persistentVolumeClaim"]["claimName"] == "convray-models"
    assert job["shutdownAfterJobFinishes"] is True


def test_a_podmonitor_scrapes_the_training_jobs_progress_on_the_pod_that_serves_it(built):
    """Before, the dashboard's training row stayed empty on Kubernetes: the job served no metrics port."""
    job = find(built["train"], "RayJob")["spec"]
    args = build_parser().parse_args(shlex.split(job["entrypoint"])[1:])
    assert args.metrics_port is not None and args.metrics_host == "0.0.0.0"  # reachable from outside the pod
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]  # driver and Ray Train workers: no other pods
    assert "workerGroupSpecs" not in job["rayClusterSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    monitor = find(built["train"], "PodMonitor")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == args.metrics_port and endpoint["path"] == "/metrics"
    assert monitor["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()


def test_alerts_hpa_and_docs_name_only_metrics_the_server_or_the_training_job_exports():
    """Families as the client library exports them (a labelled family has no samples until first used)."""
    registry = CollectorRegistry()
    Metrics(registry)
    TrainingMetrics(registry, "digits")  # the training job's (deploy/k8s/train)
    exported = set()
    for family in registry.collect():
        exported |= {family.name} | {sample.name for sample in family.samples}
        if family.type == "counter":
            exported.add(f"{family.name}_total")
        if family.type == "info":
            exported.add(f"{family.name}_info")
        if family.type == "histogram":
            exported |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
    texts = [p.read_text() for p in K8S.rglob("*.yaml")] + [(REPO_ROOT / "docs" / "deploy.md").read_text()]
    used = {name for text in texts for name in re.findall(r"\bconvray_[a-z_]+\b", text)}
    used -= {"convray_models", "convray_settings"}  # not metrics: names in prose
    assert used, "no metric named at all"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"


def test_the_readmes_metrics_table_lists_every_metric_a_server_a_training_run_or_a_search_exports():
    serving, search = CollectorRegistry(), CollectorRegistry()
    Metrics(serving)
    SearchMetrics(search, "digits", trials=2, epochs=2)  # with the training run's gauges
    first_cells = [
        line.split("|")[1]
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `convray_")
    ]
    listed = {name for cell in first_cells for name in re.findall(r"`(convray_[a-z_]+)`", cell)}
    exported = {
        {"counter": f"{family.name}_total", "info": f"{family.name}_info"}.get(family.type, family.name)
        for registry in (serving, search)
        for family in registry.collect()
    }
    assert exported <= listed, sorted(exported - listed)


def test_the_seed_init_container_copies_baked_models_once_and_atomically(built, tmp_path):
    """Run the init container's script on a copy of models/: it seeds an empty repository, then leaves it be.

    The copy holds the shipped version only, whatever else the checkout's models/ has (`make train-default`
    publishes digits/2 there, which made this test fail: found in review)."""
    init = next(c for c in frontend(built["cpu"])["initContainers"] if c["name"] == "seed-model-repository")
    script = init["args"][0]
    baked = tmp_path / "image-models"
    shutil.copytree(SHIPPED_MODELS / "digits" / "1", baked / "digits" / "1")
    target = tmp_path / "pvc"
    target.mkdir()
    env = {"PATH": "/usr/bin:/bin", "SEED_FROM": str(baked), "SEED_TO": str(target)}
    first = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    repository = ModelRepository(target)
    assert repository.model_names() == ["digits"]
    assert repository.load("digits", 1).version == 1
    assert not [p for p in target.rglob(".seed-*")], "staging directories left behind"
    (target / "digits" / "2").mkdir()  # as if training published a version
    second = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "left alone" in second.stdout
    assert sorted(Path(p).name for p in (target / "digits").iterdir()) == ["1", "2"]


@pytest.mark.parametrize("overlay", SERVING)
def test_the_settings_table_in_docs_shows_every_setting_with_its_configmap_value(built, overlay):
    docs = (REPO_ROOT / "docs" / "deploy.md").read_text()
    env = settings_env(built[overlay])
    column = SERVING.index(overlay) + 2  # | variable | default | cpu | gpu | meaning |
    for name in env_names():
        row = next((line for line in docs.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row, f"{name} has no row in docs/deploy.md"
        cell = row.split(" | ")[column]
        assert cell == (f"`{env[name]}`" if name in env else "unset"), (name, cell)


def test_the_kubernetes_prometheus_rule_carries_exactly_the_tested_alert_rules():
    """deploy/prometheus/alerts.yml (promtool-tested) is the one source; scripts/sync_k8s_alerts.py copies it."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    alerts = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())["groups"]
    documents = list(yaml.safe_load_all((root / "deploy/k8s/base/monitoring.yaml").read_text()))
    (rule,) = [d for d in documents if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == alerts
    (monitor,) = [d for d in documents if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"  # so up{job="convray"} in the rules matches


@pytest.mark.parametrize("overlay", SERVING)
def test_the_ray_pods_probe_rays_health_endpoints_without_tools_the_image_lacks(built, overlay):
    """Without probes of their own, older KubeRay operators add ones that run `wget`, not in the image: the pods
    never became Ready (found in review). Ours run the image's Python; here against a stand-in endpoint."""
    import http.server
    import threading

    cluster = find(built[overlay], "RayCluster", "convray")["spec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    answer = {"body": b"success"}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as stand_in:
        threading.Thread(target=stand_in.serve_forever, daemon=True).start()
        for pod in pods:
            ray_container = pod["spec"]["containers"][0]
            for kind in ("readinessProbe", "livenessProbe"):
                command = ray_container[kind]["exec"]["command"]
                assert command[0] == "python" and all("localhost:" in url for url in command[3:])
                port = stand_in.server_address[1]
                urls = [f"http://127.0.0.1:{port}{urllib.parse.urlsplit(url).path}" for url in command[3:]]
                run = [sys.executable, *command[1:3], *urls]
                answer["body"] = b"success"
                assert subprocess.run(run, capture_output=True, timeout=30).returncode == 0
                answer["body"] = b"failed"
                assert subprocess.run(run, capture_output=True, timeout=30).returncode == 1
        stand_in.shutdown()
