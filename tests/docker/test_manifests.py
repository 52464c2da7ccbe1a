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
COMPOSE_FILES = [os.path.join(ROOT, "docker-compose.yml"), os.path.join(ROOT, "docker", "swarm.yml")]


def defaults(arguments: list[str]) -> list[str]:
    """Compose's `${NAME:-default}` with each default, as an unconfigured `up` runs it."""
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", argument) for argument in arguments]


def parses(arguments: list[str]) -> None:
    try:
        build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"not a valid envfarm command: {arguments}")


def kubernetes_documents() -> list[dict]:
    with open(KUBERNETES) as f:
        return list(yaml.safe_load_all(f))


def test_kubernetes_manifest_matches_the_schema():
    for document in kubernetes_documents():
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_manifest_runs_valid_envfarm_commands():
    documents = {(d["kind"], d["metadata"]["name"]): d for d in kubernetes_documents()}
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


def test_kubernetes_manifest_meets_what_a_platform_engineer_checks():
    for document in kubernetes_documents():
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
    documents = {(d["kind"], d["metadata"]["name"]): d for d in kubernetes_documents()}
    assert documents["Deployment", "envfarm-broker"]["spec"]["strategy"]["type"] == "Recreate"  # never two brokers
    job = documents["Job", "envfarm-trainer-example"]["spec"]
    assert job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0
