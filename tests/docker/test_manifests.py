"""The deployment files: Compose, Swarm and Kubernetes, checked without a cluster.

Each is validated against its schema (Kubernetes' own, through kubernetes-validate; Compose's,
through docker-compose, `docker compose` and `docker stack config` where installed), and every envfarm command in
them (entrypoint arguments and health checks) must parse with envfarm's own command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from envfarm.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBERNETES = os.path.join(ROOT, "docker", "kubernetes", "envfarm.yaml")
KUBERNETES_CURVE = os.path.join(ROOT, "docker", "kubernetes", "envfarm-curve.yaml")
KUBERNETES_FILES = [KUBERNETES, KUBERNETES_CURVE]
COMPOSE_FILES = [os.path.join(ROOT, "docker-compose.yml"), os.path.join(ROOT, "docker", "swarm.yml")]
# Curve overlays, each with the file it goes over: (base, overlay), as the tools merge them.
CURVE_OVERLAYS = {
    "compose.curve.yml": ("docker-compose.yml", "docker/compose.curve.yml"),
    "swarm.curve.yml": ("docker/swarm.yml", "docker/swarm.curve.yml"),
}


def defaults(arguments: list[str]) -> list[str]:
    """Compose's `${NAME:-default}` with each default, as an unconfigured `up` runs it."""
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", argument) for argument in arguments]


def parses(arguments: list[str]) -> None:
    try:
        build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"not a valid envfarm command: {arguments}")


def kubernetes_documents(path: str = KUBERNETES) -> list[dict]:
    with open(path) as f:
        return list(yaml.safe_load_all(f))


@pytest.mark.parametrize("path", KUBERNETES_FILES, ids=os.path.basename)
def test_kubernetes_manifest_matches_the_schema(path):
    for document in kubernetes_documents(path):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", KUBERNETES_FILES, ids=os.path.basename)
def test_kubernetes_manifest_runs_valid_envfarm_commands(path):
    documents = {(d["kind"], d["metadata"]["name"]): d for d in kubernetes_documents(path)}
    port = documents["Service", "envfarm-broker"]["spec"]["ports"][0]["port"]
    for workload in (
        ("Deployment", "envfarm-broker"),
        ("Deployment", "envfarm-worker"),
        ("Job", "envfarm-trainer-example"),
    ):
        [container] = documents[workload]["spec"]["template"]["spec"]["containers"]
        parses(container["args"])
        for probe in ("livenessProbe", "readinessProbe"):
            if probe in container:
                command = container[probe]["exec"]["command"]
                assert command[0] == "envfarm"
                parses(command[1:])
    worker = documents["Deployment", "envfarm-worker"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(worker["args"])
    assert args.broker == f"tcp://envfarm-broker:{port}" and args.processes == "auto"
    assert (
        worker["livenessProbe"]["exec"]["command"][2] == args.alive_file
    )  # the probe reads the file the worker touches
    assert worker["resources"]["limits"]["cpu"]  # what --processes auto sizes itself from


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=os.path.basename)
def test_compose_files_run_valid_envfarm_commands(path):
    with open(path) as f:
        services = yaml.safe_load(f)["services"]
    for service in services.values():
        parses(defaults(service["command"]))
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "envfarm"]
        parses(test[2:])
    worker = build_parser().parse_args(defaults(services["worker"]["command"]))
    assert services["worker"]["healthcheck"]["test"][3] == worker.alive_file and worker.processes == "auto"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=os.path.basename)
def test_compose_files_match_the_compose_schema(path):
    checks = []
    if shutil.which("docker-compose"):
        checks.append(["docker-compose", "-f", path, "config", "-q"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        checks.append(["docker", "compose", "-f", path, "config", "-q"])
    if (
        shutil.which("docker")
        and path.endswith("swarm.yml")
        and subprocess.run(["docker", "stack", "config", "--help"], capture_output=True).returncode == 0
    ):
        checks.append(["docker", "stack", "config", "-c", path])
    if not checks:
        pytest.skip("none of docker-compose, `docker compose` and `docker stack config` is installed")
    for command in checks:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"


@pytest.mark.parametrize("path", KUBERNETES_FILES, ids=os.path.basename)
def test_kubernetes_manifest_meets_what_a_platform_engineer_checks(path):
    for document in kubernetes_documents(path):
        if document["kind"] == "Service":
            continue
        pod = document["spec"]["template"]["spec"]
        # Pod Security Standards, 'restricted'
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            name = f"{document['metadata']['name']}/{container['name']}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert container["imagePullPolicy"] == "IfNotPresent", (
                name
            )  # a ':latest' tag is otherwise pulled at every start
            assert "limits" in container["resources"], name
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in container:  # the default of 1 s restarts healthy pods under a busy CPU quota
                    assert container[probe].get("timeoutSeconds", 1) >= 5, f"{name} {probe}"
    documents = {(d["kind"], d["metadata"]["name"]): d for d in kubernetes_documents(path)}
    assert documents["Deployment", "envfarm-broker"]["spec"]["strategy"]["type"] == "Recreate"  # never two brokers
    job = documents["Job", "envfarm-trainer-example"]["spec"]
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0


# ------------------------------------------------------------------ Curve: keys as secrets

CURVE_FLAGS = ("--curve-secret", "--curve-clients", "--broker-key")


def _key_paths(arguments: list[str], environment: dict[str, str]) -> list[str]:
    """The key files and folders a command reads: its Curve flags' values, and status's variables."""
    paths = [arguments[i + 1] for i, argument in enumerate(arguments[:-1]) if argument in CURVE_FLAGS]
    return paths + [
        value for name, value in environment.items() if name in ("ENVFARM_CURVE_SECRET", "ENVFARM_BROKER_KEY")
    ]


def _assert_keys_mounted(name: str, paths: list[str], mounted: set[str]) -> None:
    """Each key path is a mounted file, or (--curve-clients) a folder of mounted files by role."""
    for path in paths:
        if path.endswith("/clients"):
            roles = {m[len(path) + 1 :].split("/")[0] for m in mounted if m.startswith(path + "/")}
            assert roles == {"workers", "trainers", "admins"}, f"{name}: {path} holds {roles}"
        else:
            assert path in mounted, f"{name}: {path} is not mounted ({sorted(mounted)})"


def _strip_curve(document):
    """A Curve manifest's document without what Curve adds: what must equal envfarm.yaml's."""
    if isinstance(document, dict):
        return {
            key: _strip_curve(value)
            for key, value in document.items()
            if key not in ("volumes", "volumeMounts", "env", "fsGroup")
        }
    if isinstance(document, list):
        if "--curve-secret" in document:
            document = document[: document.index("--curve-secret")]
        return [_strip_curve(item) for item in document]
    return document


def test_kubernetes_curve_manifest_is_the_plain_one_with_keys_from_a_secret():
    plain, curve = kubernetes_documents(KUBERNETES), kubernetes_documents(KUBERNETES_CURVE)
    assert [_strip_curve(d) for d in curve] == plain  # nothing else drifts apart
    for document in curve:
        if document["kind"] == "Service":
            continue
        pod = document["spec"]["template"]["spec"]
        # Readable by the pod's user whatever the key's owner and mode where it was made: the
        # kubelet gives the files to the fsGroup, group-readable only.
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
        [volume] = pod["volumes"]
        assert volume["secret"]["secretName"] == "envfarm-curve" and volume["secret"]["defaultMode"] == 0o440
        [container] = pod["containers"]
        [mount] = container["volumeMounts"]
        assert mount["name"] == volume["name"] and mount["readOnly"] is True
        mounted = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
        environment = {variable["name"]: variable["value"] for variable in container.get("env", [])}
        paths = _key_paths(container["args"], environment)
        assert paths, f"{document['metadata']['name']} runs without Curve"
        _assert_keys_mounted(document["metadata"]["name"], paths, mounted)
        # Each pod holds one secret key, its own.
        secrets = {item["key"] for item in volume["secret"]["items"] if item["key"].endswith("_secret")}
        assert len(secrets) == 1, secrets


def test_swarm_publishes_the_broker_only_with_curve_on():
    with open(os.path.join(ROOT, "docker", "swarm.yml")) as f:
        plaintext = yaml.safe_load(f)["services"]
    assert not any("ports" in service for service in plaintext.values())  # never the plaintext farm
    with open(os.path.join(ROOT, "docker", "swarm.curve.yml")) as f:
        curve = yaml.safe_load(f)["services"]
    [published] = curve["broker"]["ports"]
    assert published["target"] == 5555
    broker = build_parser().parse_args(curve["broker"]["command"])
    assert broker.curve_secret and broker.curve_clients


def _merged(command: list[str]) -> dict:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return yaml.safe_load(result.stdout)


def _merge_tools(base: str, overlay: str) -> list[list[str]]:
    tools = []
    if overlay.endswith("swarm.curve.yml"):
        if (
            shutil.which("docker")
            and subprocess.run(["docker", "stack", "config", "--help"], capture_output=True).returncode == 0
        ):
            tools.append(["docker", "stack", "config", "-c", base, "-c", overlay])
        return tools
    if shutil.which("docker-compose"):
        tools.append(["docker-compose", "-f", base, "-f", overlay, "config"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        tools.append(["docker", "compose", "-f", base, "-f", overlay, "config"])
    return tools


@pytest.mark.parametrize("files", CURVE_OVERLAYS.values(), ids=CURVE_OVERLAYS.keys())
def test_curve_overlays_as_merged_run_valid_commands_with_their_keys_mounted(files):
    """Merged by the tools themselves (docker stack config once appended one health check's
    arguments to another's): every command and health check parses, every key path a command
    reads is a secret mounted in its container, and the broker's health check asks with a key."""
    tools = _merge_tools(*files)
    if not tools:
        pytest.skip("none of docker-compose, `docker compose` and `docker stack config` is installed")
    for tool in tools:
        services = _merged(tool)["services"]
        for name, service in services.items():
            command = defaults([str(argument) for argument in service["command"]])
            parses(command)
            test = service["healthcheck"]["test"]
            assert test[:2] == ["CMD", "envfarm"], f"{' '.join(tool)}: {name}: {test}"
            parses(defaults([str(argument) for argument in test[2:]]))
            mounted = {
                secret["target"] if secret["target"].startswith("/") else f"/run/secrets/{secret['target']}"
                for secret in service["secrets"]
            }
            environment = service.get("environment") or {}
            paths = _key_paths(command, environment)
            assert paths, f"{' '.join(tool)}: {name} runs without Curve"
            _assert_keys_mounted(f"{' '.join(tool)}: {name}", paths, mounted)
        broker = services["broker"]
        assert "status" in broker["healthcheck"]["test"] and {
            "ENVFARM_CURVE_SECRET",
            "ENVFARM_BROKER_KEY",
        } <= set(broker["environment"]), f"{' '.join(tool)}: the broker's health check has no key"
