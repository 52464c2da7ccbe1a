"""`docker stack deploy` of the farm on this engine's Swarm, used by a trainer on this host, for real.

Runs where ENVFARM_DOCKER_TESTS=1 (CI sets it where a Docker engine answers). On an engine not in
a swarm it makes a one-node swarm on loopback and leaves it afterwards; an engine already in a
swarm of one node is used as it is (a swarm of several is skipped: the test's image exists on this
node only). The image is built under a tag of its own, from docker/build-base.sh's base, and
removed after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from polling import wait_until

from envfarm.status import query

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(
    os.environ.get("ENVFARM_DOCKER_TESTS") != "1", reason="set ENVFARM_DOCKER_TESTS=1 to run the Docker tests"
)


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def test_swarm_stack_with_curve_serves_a_host_trainer_and_leaves_nothing(tmp_path):
    """docker/swarm.curve.yml's header, as a user follows it: `envfarm keygen`, then
    `docker stack deploy -c docker/swarm.yml -c docker/swarm.curve.yml`; the broker's port is
    published (Curve is on), a trainer here leases workers and steps, and `docker stack rm`
    leaves no service, container, network or secret."""
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    if state == "active" and len(docker("node", "ls", "-q").stdout.split()) != 1:
        pytest.skip("this engine is in a swarm of several nodes: the test's image would exist on one only")
    if state not in ("active", "inactive"):
        pytest.skip(f"this engine's swarm is {state!r}")
    base = subprocess.run([os.path.join(ROOT, "docker", "build-base.sh")], capture_output=True, text=True, timeout=900)
    if base.returncode == 3:
        pytest.skip(base.stderr.strip())
    assert base.returncode == 0, base.stderr[-2000:]
    keys = tmp_path / "keys"
    keygen = subprocess.run(
        [sys.executable, "-m", "envfarm", "keygen", str(keys), "broker", "worker", "trainer"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keygen.returncode == 0, keygen.stderr  # 0600, this user's: Swarm mounts secrets for the image's user
    stack, port = f"eftest{os.getpid()}", str(40000 + os.getpid() % 20000)
    image = f"envfarm-test-swarm-{os.getpid()}:latest"  # a tag of its own, never the user's envfarm:latest
    environment = {**os.environ, "ENVFARM_IMAGE": image, "ENVFARM_KEYS": str(keys), "ENVFARM_PORT": port}
    broker = f"tcp://127.0.0.1:{port}"
    trainer_keys = (str(keys / "trainer.key_secret"), str(keys / "broker.key"))
    had_gateway_bridge = docker("network", "inspect", "docker_gwbridge").returncode == 0
    initialised = False
    try:
        # Built as the compose farm is (with the `docker compose` plugin where there is one: its
        # BuildKit cache, warm from the compose tests, is not pruned with the legacy builder's images).
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            build = ["docker", "compose", "-p", stack, "build", "broker"]
        else:
            build = ["docker", "build", "-q", "-f", "docker/Dockerfile", "--build-arg", f"BASE={base.stdout.strip()}"]
            build += ["--build-arg", "OFFLINE=1", "-t", image, "."]
        built = subprocess.run(
            build,
            cwd=ROOT,
            env={**environment, "ENVFARM_BASE": base.stdout.strip(), "ENVFARM_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, built.stderr[-2000:]
        if state == "inactive":
            # Loopback only: the swarm's management port is not opened to the network.
            init = docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
            assert init.returncode == 0, init.stderr
            initialised = True
        deploy = subprocess.run(
            ["docker", "stack", "deploy", "--resolve-image", "never"]
            + ["-c", "docker/swarm.yml", "-c", "docker/swarm.curve.yml", stack],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr[-2000:]
        # 4 worker tasks, each one process per CPU of its limit (2) that this host has.
        assert wait_until(lambda: _workers(broker, trainer_keys) >= 4, 90), (
            "the workers did not register: "
            + docker("service", "logs", "--tail", "5", f"{stack}_broker").stdout[-2000:]
        )
        assert _workers(broker) == -1  # published, but only to the keys: no answer without one
        trainer = subprocess.run(
            [sys.executable, "docker/example_trainer.py", broker, "--curve", *trainer_keys, "--steps", "3000"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trainer.returncode == 0, trainer.stderr[-2000:]
        assert "spare for on_failure='restart'" in trainer.stdout, trainer.stdout
        assert re.search(r"\d+ steps from \d+ farm workers at [\d,]+ steps/s", trainer.stdout), trainer.stdout
        # The broker's health check asks the status with its own key (an admin's), from the secrets.
        task = ["--filter", f"label=com.docker.swarm.service.name={stack}_broker"]
        assert wait_until(lambda: docker("ps", "-q", "--filter", "health=healthy", *task).stdout.strip() != "", 30), (
            docker("ps", "-a", "--format", "{{.Status}}", *task).stdout
        )
    finally:
        removed = docker("stack", "rm", stack)
        gone = wait_until(lambda: not any(_stack_objects(stack).values()), 90)  # stack rm returns before they go
        if initialised:
            docker("swarm", "leave", "--force")
            if not had_gateway_bridge:
                docker("network", "rm", "docker_gwbridge")  # made by `swarm init`, kept by `swarm leave`
        docker("rmi", image)
        docker("image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=envfarm")
    assert removed.returncode == 0, removed.stderr
    assert gone, _stack_objects(stack)
    assert docker("images", "-q", image).stdout.strip() == ""
    if initialised:
        assert docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
        assert had_gateway_bridge or docker("network", "inspect", "docker_gwbridge").returncode != 0


def _stack_objects(stack: str) -> dict[str, str]:
    """What of the stack is left: its services, containers, networks and secrets."""
    label = f"label=com.docker.stack.namespace={stack}"
    return {
        kind: docker(*command, "-q", "--filter", label).stdout.strip()
        for kind, command in {
            "services": ["service", "ls"],
            "containers": ["ps", "-a"],
            "networks": ["network", "ls"],
            "secrets": ["secret", "ls"],
        }.items()
    }  # (outside a swarm, `service ls` and `secret ls` print nothing on stdout)


def _workers(broker: str, curve: tuple[str, str] | None = None) -> int:
    try:
        return len(query(broker, curve, timeout=1.0)["workers"])
    except TimeoutError:
        return -1
