"""Deployment files: the rules the Dockerfile, docker-compose.yml, .env.example and deploy/k8s rely on.

No Docker or Kubernetes here: the files are parsed and checked against each other and against the server's own
settings, so a renamed setting, a typo in a variable or a selector that no longer matches fails a test instead of
a deployment. The two health checks that run inside containers are run here against real servers.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from conftest import free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import QuietHandler, http_server

from imagesearch.config import DEFAULT_MODEL, ENV_PREFIX, Settings, client_target

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTING_NAMES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
# Read by the CLI's client commands (config.client_target), not by the server.
CLIENT_NAMES = {ENV_PREFIX + "TARGET"}
ENV_NAME = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+")

GRPC_PORT = 50051
HTTP_PORT = 8080
QDRANT_REST_PORT = 6333
QDRANT_GRPC_PORT = 6334
REDIS_PORT = 6379


# ---- helpers ------------------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=VALUE" list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def env_example_names() -> list[str]:
    """Variables .env.example sets or documents (a commented-out `# NAME=default` line documents one)."""
    names = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.append(match.group(1))
    return names


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def the_deployment() -> dict[str, Any]:
    [deployment] = k8s("Deployment", "imagesearch")
    return deployment


def the_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = the_deployment()["spec"]["template"]["spec"]["containers"]
    [container] = containers
    return container


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile() if kw == keyword]


def duration_s(text: str) -> float:
    """Compose durations: "30s", "1m30s", "500ms"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- docker-compose.yml -------------------------------------------------------------------------------------------


def test_compose_every_service_has_a_healthcheck() -> None:
    for name, service in compose()["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_compose_dependencies_exist_and_wait_until_healthy() -> None:
    services = compose()["services"]
    depends_on = services["imagesearch"]["depends_on"]
    assert set(depends_on) == {"qdrant", "redis"}
    for name, service in services.items():
        dependencies = service.get("depends_on") or {}
        # The short list form means "started", which for a database is not "ready".
        assert isinstance(dependencies, dict), f"{name}: depends_on needs conditions"
        for dependency, rule in dependencies.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert rule.get("condition") == "service_healthy", f"{name} -> {dependency} must wait for service_healthy"
            assert services[dependency].get("healthcheck"), f"{dependency} has no healthcheck to wait for"


def test_compose_named_volumes_are_declared() -> None:
    spec = compose()
    declared = set(spec.get("volumes") or {})
    used = set()
    for service in spec["services"].values():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type", "volume") == "volume":
                    used.add(volume["source"])
                continue
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):  # paths are bind mounts
                used.add(source)
    assert used, "expected named volumes for the model cache, the data and Qdrant"
    assert used <= declared, f"undeclared volumes: {used - declared}"
    mounts = {v.split(":")[1] for v in spec["services"]["imagesearch"]["volumes"]}
    assert {"/models", "/data"} <= mounts


def test_compose_points_the_service_at_the_other_containers() -> None:
    services = compose()["services"]
    env = service_env(services["imagesearch"])

    # The URL is Qdrant's REST address; every call goes over gRPC, to the same host on the gRPC port.
    qdrant = urlsplit(env["IMAGESEARCH_QDRANT_URL"])
    assert (qdrant.scheme, qdrant.hostname, qdrant.port) == ("http", "qdrant", QDRANT_REST_PORT)
    assert qdrant.hostname in services
    assert Settings.from_env(env).qdrant_grpc_port == QDRANT_GRPC_PORT
    redis = urlsplit(env["IMAGESEARCH_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", REDIS_PORT)
    assert redis.hostname in services
    # .env supplies the rest; the wiring under `environment` wins over it.
    assert services["imagesearch"]["env_file"] in (".env", [".env"])
    assert env["IMAGESEARCH_DATA_DIR"] == "/data"


def test_compose_gives_the_drain_time_to_finish() -> None:
    service = compose()["services"]["imagesearch"]
    assert duration_s(service["stop_grace_period"]) > Settings().shutdown_grace_s


def test_compose_publishes_the_ports_the_image_exposes() -> None:
    service = compose()["services"]["imagesearch"]
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in service["ports"]}
    metrics_port = int(service_env(service)["IMAGESEARCH_METRICS_PORT"])
    http_port = int(service_env(service)["IMAGESEARCH_HTTP_PORT"])
    assert container_ports == {GRPC_PORT, http_port, metrics_port}
    exposed = {int(p) for args in dockerfile_args("EXPOSE") for p in args.split()}
    assert container_ports <= exposed


def test_compose_variables_are_settings_of_the_server() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    unknown = set(ENV_NAME.findall(text)) - SETTING_NAMES - CLIENT_NAMES
    assert not unknown, f"docker-compose.yml names variables the server does not read: {sorted(unknown)}"


def test_compose_model_build_arg_defaults_to_the_servers_default_model() -> None:
    arg = compose()["services"]["imagesearch"]["build"]["args"]["MODEL"]
    assert arg == "${IMAGESEARCH_MODEL:-" + DEFAULT_MODEL + "}"


# ---- .env.example -------------------------------------------------------------------------------------------------


def test_env_example_names_only_real_settings() -> None:
    names = [n for n in env_example_names() if n.startswith(ENV_PREFIX)]
    unknown = set(names) - SETTING_NAMES - CLIENT_NAMES
    assert not unknown, f".env.example names variables the server does not read (typo or drift): {sorted(unknown)}"
    assert len(names) == len(set(names)), "a variable is listed twice"


def test_env_example_documents_every_setting() -> None:
    missing = SETTING_NAMES - set(env_example_names())
    assert not missing, f"settings missing from .env.example: {sorted(missing)}"


def test_client_only_names_are_read_by_the_client() -> None:
    for name in CLIENT_NAMES:
        assert client_target({name: "example:1234"}) == "example:1234"


# ---- Kubernetes ---------------------------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_are_all_in_the_kustomization() -> None:
    kinds = {d["kind"] for d in k8s_documents()}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_probes_are_on_the_container_ports() -> None:
    container = the_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [configmap] = k8s("ConfigMap", "imagesearch")
    assert int(configmap["data"].get("IMAGESEARCH_PORT", GRPC_PORT)) == ports["grpc"]
    for probe in ("startupProbe", "livenessProbe"):
        assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    # Readiness through the HTTP/JSON port's /healthz: the same health, and that port answering too.
    readiness = container["readinessProbe"]
    assert set(readiness) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"httpGet"}
    assert readiness["httpGet"]["path"] == "/healthz" and readiness["httpGet"]["port"] == "http"
    assert int(configmap["data"]["IMAGESEARCH_HTTP_PORT"]) == ports["http"] == HTTP_PORT


def test_k8s_labels_and_selectors_match() -> None:
    deployment = the_deployment()
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    services = k8s("Service")
    assert services
    container_port_names = {p["name"] for p in the_container()["ports"]}
    for service in services:
        assert service["spec"]["selector"] == selector, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_port_names, port
    [hpa] = k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    for pdb in k8s("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_k8s_hpa_scales_on_cpu_relative_to_a_request() -> None:
    [hpa] = k8s("HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilization is a percentage of the request: without one the HPA cannot compute it.
    assert the_container()["resources"]["requests"]["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_settings_come_from_the_configmap_and_are_real() -> None:
    [configmap] = k8s("ConfigMap", "imagesearch")
    env_from = the_container()["envFrom"]
    assert {"configMapRef": {"name": "imagesearch"}} in env_from
    unknown = set(configmap["data"]) - SETTING_NAMES
    assert not unknown, f"ConfigMap keys the server does not read: {sorted(unknown)}"
    # Settings would refuse these values at start; better to learn it here.
    Settings.from_env(configmap["data"])
    # Replicas share one catalogue and one cache: an embedded store would give each pod its own.
    assert configmap["data"]["IMAGESEARCH_QDRANT_URL"]
    assert configmap["data"]["IMAGESEARCH_REDIS_URL"]


def test_k8s_termination_grace_outlasts_the_drain() -> None:
    [configmap] = k8s("ConfigMap", "imagesearch")
    grace_s = float(configmap["data"].get("IMAGESEARCH_SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    pre_stop = the_container().get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    pause_s = float(command[1]) if command[:1] == ["sleep"] else float(pre_stop.get("sleep", {}).get("seconds", 0))
    termination = the_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert termination > pause_s + grace_s


def test_k8s_runs_as_the_images_non_root_user_with_a_model_cache() -> None:
    pod = the_deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [user] = dockerfile_args("USER")[-1:]
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    container = the_container()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    assert mounts["/models"] in volumes
    assert set(mounts.values()) <= volumes


def test_k8s_metrics_port_is_the_one_scraped() -> None:
    [configmap] = k8s("ConfigMap", "imagesearch")
    [metrics_port] = [p["containerPort"] for p in the_container()["ports"] if p["name"] == "metrics"]
    annotations = the_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(configmap["data"]["IMAGESEARCH_METRICS_PORT"]) == metrics_port == int(annotations["prometheus.io/port"])


# ---- Dockerfile ---------------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    assert len(dockerfile_args("FROM")) >= 2
    users = dockerfile_args("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [check] = dockerfile_args("HEALTHCHECK")
    assert "CMD" in check.split() and "imagesearch-healthcheck" in check
    exposed = {int(p) for args in dockerfile_args("EXPOSE") for p in args.split()}
    assert GRPC_PORT in exposed
    assert dockerfile_args("ENTRYPOINT") == ['["imagesearch"]']
    assert dockerfile_args("CMD") == ['["serve"]']


def test_dockerfile_environment_volumes_and_model_argument() -> None:
    env: dict[str, str] = {}
    for args in dockerfile_args("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    assert env["IMAGESEARCH_DATA_DIR"] == "/data"
    assert env["HF_HOME"] == "/models"
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - SETTING_NAMES
    assert not unknown, f"Dockerfile sets variables the server does not read: {sorted(unknown)}"
    volumes = [v for args in dockerfile_args("VOLUME") for v in re.findall(r'"([^"]+)"', args)]
    assert {"/data", "/models"} <= set(volumes)
    assert f"MODEL={DEFAULT_MODEL}" in dockerfile_args("ARG")
    assert "PRELOAD_MODEL=false" in dockerfile_args("ARG")
    # The runtime installs no dev extras: only `pip install .` through the shared script.
    assert ".[dev]" not in (ROOT / "Dockerfile").read_text()
    assert ".[dev]" not in (ROOT / "deploy" / "install-venv.sh").read_text()


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # An allow-list: everything (.git, .venv, data, caches, benchmarks/results, .env) is out unless let back in.
    assert patterns[0] == "*"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for args in dockerfile_args("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        for source in words[:-1]:
            source = source.rstrip("/")
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source}: not let into the build context by .dockerignore"
            )
            assert (ROOT / source).exists(), f"COPY {source}: no such file"


# ---- health checks run inside the containers ----------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "deploy" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30)


def test_image_healthcheck_follows_the_grpc_health_service(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    target = f"127.0.0.1:{port}"
    assert run_healthcheck(target).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_healthcheck(target)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    servicer.set("imagesearch.v1.ImageSearchService", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(target, "imagesearch.v1.ImageSearchService").returncode == 0


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_image_healthcheck_checks_the_http_port_when_set(
    health_server: tuple[int, health.HealthServicer], monkeypatch: pytest.MonkeyPatch, status: int, healthy: bool
) -> None:
    class Healthz(QuietHandler):
        def do_GET(self) -> None:
            body = b'{"status": "SERVING"}' if status == 200 else b'{"status": "NOT_SERVING"}'
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(body)

    with http_server(Healthz) as port:
        monkeypatch.setenv("IMAGESEARCH_HTTP_PORT", str(port))
        assert (run_healthcheck(f"127.0.0.1:{health_server[0]}").returncode == 0) is healthy
        monkeypatch.setenv("IMAGESEARCH_HTTP_PORT", str(free_port()))  # nothing listens there
        assert run_healthcheck(f"127.0.0.1:{health_server[0]}").returncode == 1


def test_image_healthcheck_fails_when_nothing_listens() -> None:
    result = run_healthcheck(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


class _Readyz(QuietHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"all shards are ready")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash, as in the qdrant image")
@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_qdrant_healthcheck_reads_readyz_with_bash_builtins(status: int, healthy: bool) -> None:
    test = compose()["services"]["qdrant"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    handler = type("Handler", (_Readyz,), {"status": status})
    with http_server(handler) as port:
        # Compose turns $$ into $; the check talks to Qdrant's REST port, here our stand-in's.
        command = test[3].replace("$$", "$").replace("/6333", f"/{port}")
        result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=10)
        assert (result.returncode == 0) is healthy


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash, as in the qdrant image")
def test_qdrant_healthcheck_fails_when_nothing_listens() -> None:
    test = compose()["services"]["qdrant"]["healthcheck"]["test"]
    command = test[3].replace("$$", "$").replace("/6333", f"/{free_port()}")
    assert subprocess.run(["bash", "-c", command], capture_output=True, timeout=10).returncode != 0


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"IMAGESEARCH_{f.name.upper()}" not in readme]
    assert not missing, f"settings missing from the README's configuration table: {missing}"
