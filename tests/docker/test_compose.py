"""`docker-compose up` of the farm, used by a trainer on this host, for real.

Runs where ENVFARM_DOCKER_TESTS=1 (CI sets it where a Docker engine answers). The base image is
made from Debian's packages by docker/build-base.sh and cached, as no registry can be pulled from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import zmq
from polling import wait_until

import envfarm
from envfarm.status import query

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(
    os.environ.get("ENVFARM_DOCKER_TESTS") != "1", reason="set ENVFARM_DOCKER_TESTS=1 to run the Docker tests"
)


COMPOSE_COMMANDS = {"docker-compose": ["docker-compose"], "docker compose": ["docker", "compose"]}


def compose_available(command: list[str]) -> bool:
    return (
        shutil.which(command[0]) is not None
        and subprocess.run([*command, "version"], capture_output=True).returncode == 0
    )


@pytest.mark.parametrize("compose_command", COMPOSE_COMMANDS.values(), ids=COMPOSE_COMMANDS.keys())
def test_compose_farm_serves_a_trainer_and_survives_a_killed_worker(compose_command):
    if not compose_available(compose_command):
        pytest.skip(f"{' '.join(compose_command)} is not installed")

    def compose(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*compose_command, "-p", project, *args],
            cwd=ROOT,
            env={**os.environ, **environment},
            capture_output=True,
            text=True,
            timeout=600,
        )

    base = subprocess.run([os.path.join(ROOT, "docker", "build-base.sh")], capture_output=True, text=True, timeout=900)
    if base.returncode == 3:
        pytest.skip(base.stderr.strip())
    assert base.returncode == 0, base.stderr[-2000:]
    project, port = f"eftest{os.getpid()}", str(20000 + os.getpid() % 20000)
    # The workers run as this user, so that the trainer here shares memory with them.
    # An image tag of its own: a test must not overwrite (or remove) the user's envfarm:latest.
    image = f"envfarm-test-{os.getpid()}:latest"
    environment = {
        "ENVFARM_BASE": base.stdout.strip(),
        "ENVFARM_OFFLINE": "1",
        "ENVFARM_PORT": port,
        "ENVFARM_UID": str(os.getuid()),
        "ENVFARM_IMAGE": image,
    }
    broker = f"tcp://127.0.0.1:{port}"
    try:
        built = compose("up", "-d", "--build", "--scale", "worker=2")
        assert built.returncode == 0, built.stderr[-2000:]
        assert wait_until(lambda: _workers(broker) == 2, 60), (
            "the workers did not register"
        )  # one process per container's CPU
        containers = compose("ps", "-q", "worker").stdout.split()
        assert wait_until(lambda: all(_health(c) == "healthy" for c in containers), 60), (
            "the workers' health checks did not pass"
        )
        quota = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--cpus",
                "1",
                "--entrypoint",
                "python3",
                image,
                "-c",
                "import os; from envfarm.transport.cpus import available_cpus; print(available_cpus(), os.cpu_count())",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert quota.stdout.split()[0] == "1", quota.stdout + quota.stderr  # the cgroup quota, not the host's cores
        envs = envfarm.make_vec("CartPole-v1", 4, broker=broker, on_failure="restart")
        try:
            # Workers in containers reach the trainer on this host, and share its memory.
            assert all(worker.shared_memory for worker in envs._workers)
            # Its data socket is bound where the broker sees it (the compose network's gateway), not on
            # every interface of this host.
            bound = envs._router.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            assert not bound.startswith(("tcp://0.0.0.0:", "tcp://127.")), bound
            envs.reset(seed=0)
            for _ in range(2000):
                envs.step(envs.action_space.sample())
            subprocess.run(["docker", "kill", envs._workers[0].host], check=True, capture_output=True)  # its container
            start, restarted = time.monotonic(), False
            while not restarted and time.monotonic() - start < 20:
                _, _, _, truncated, info = envs.step(envs.action_space.sample())
                restarted = "envfarm_restarted" in info
            assert restarted and truncated.all(), "the killed worker's envs were not restarted"
            for _ in range(500):
                envs.step(envs.action_space.sample())
        finally:
            envs.close()
        [broker_container] = compose("ps", "-q", "broker").stdout.split()
        scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())"
        metrics = subprocess.run(
            ["docker", "exec", broker_container, "python3", "-c", scrape], capture_output=True, text=True, timeout=60
        )
        assert "envfarm_leases_total 1.0" in metrics.stdout and "envfarm_restarts_total 1.0" in metrics.stdout, (
            metrics.stdout[-2000:]
        )
        # The broker stops (at once: SIGTERM reaches it through the init): an idle worker that cannot
        # reach it stops touching its alive file after --broker-grace (10 s), so its check fails.
        assert _stop_seconds(broker_container) < 2.0
        worker = compose("ps", "-q", "worker").stdout.split()[0]
        alive = ["docker", "exec", worker, "envfarm", "alive", "/tmp/envfarm-alive", "--within", "3"]
        assert wait_until(lambda: subprocess.run(alive, capture_output=True).returncode == 1, 30), (
            "a worker without its broker stayed healthy"
        )
        assert _stop_seconds(worker) < 2.0
    finally:
        _down(compose)
    _assert_nothing_left(project, image)


@pytest.mark.parametrize("compose_command", COMPOSE_COMMANDS.values(), ids=COMPOSE_COMMANDS.keys())
def test_compose_farm_with_curve_serves_a_host_trainer(compose_command, tmp_path):
    """docker/compose.curve.yml's header, as a user follows it: keys by `envfarm keygen`, handed to
    the containers as Docker secrets; the farm admits only them, and the README's example trainer
    on this host, given its key, sizes its lease to leave a worker spare and trains."""
    if not compose_available(compose_command):
        pytest.skip(f"{' '.join(compose_command)} is not installed")
    base = subprocess.run([os.path.join(ROOT, "docker", "build-base.sh")], capture_output=True, text=True, timeout=900)
    if base.returncode == 3:
        pytest.skip(base.stderr.strip())
    assert base.returncode == 0, base.stderr[-2000:]
    keys = tmp_path / "keys"
    # A compose secret is a bind mount keeping this host's owner and mode (0600): the containers
    # run as the keys' owner, or, for root (never ENVFARM_UID=0), the keys are given to theirs.
    uid = "1000" if os.getuid() == 0 else str(os.getuid())
    owner = ["--owner", uid] if os.getuid() == 0 else []
    keygen = subprocess.run(
        [sys.executable, "-m", "envfarm", "keygen", str(keys), "broker", "worker", "trainer", *owner],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keygen.returncode == 0, keygen.stderr
    project, port = f"eftestc{os.getpid()}", str(20001 + os.getpid() % 20000)
    image = f"envfarm-test-curve-{os.getpid()}:latest"
    environment = {
        "ENVFARM_BASE": base.stdout.strip(),
        "ENVFARM_OFFLINE": "1",
        "ENVFARM_PORT": port,
        "ENVFARM_UID": uid,
        "ENVFARM_IMAGE": image,
        "ENVFARM_KEYS": str(keys),
    }
    files = ["-f", "docker-compose.yml", "-f", "docker/compose.curve.yml"]

    def compose(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*compose_command, "-p", project, *files, *args],
            cwd=ROOT,
            env={**os.environ, **environment},
            capture_output=True,
            text=True,
            timeout=600,
        )

    broker = f"tcp://127.0.0.1:{port}"
    trainer_keys = (str(keys / "trainer.key_secret"), str(keys / "broker.key"))
    try:
        built = compose("up", "-d", "--build", "--scale", "worker=3")
        assert built.returncode == 0, built.stderr[-2000:]
        assert wait_until(lambda: _workers(broker, trainer_keys) == 3, 60), (
            "the workers did not register: " + compose("logs", "--tail", "5").stdout[-2000:]
        )
        [broker_container] = compose("ps", "-q", "broker").stdout.split()
        # Its health check asks the status with the broker's own key (an admin's).
        assert wait_until(lambda: _health(broker_container) == "healthy", 60), "the broker's health check failed"
        assert _workers(broker) == -1  # without a key: no answer at all
        trainer = subprocess.run(
            [sys.executable, "docker/example_trainer.py", broker, "--curve", *trainer_keys, "--steps", "3000"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trainer.returncode == 0, trainer.stderr[-2000:]
        assert "3 free workers (12 slots): leasing 8 envs, leaving 1 worker (4 slots) spare" in trainer.stdout
        assert "shared memory: " in trainer.stdout and "steps from 2 farm workers" in trainer.stdout, trainer.stdout
        # A key the container's user cannot read: one line naming the file and the uid, no traceback.
        closed = tmp_path / "closed.key_secret"
        shutil.copy(keys / "worker.key_secret", closed)
        os.chmod(closed, 0o600)
        stranger = "1001" if uid == "1000" else "1000"
        refused = subprocess.run(
            [
                "docker", "run", "--rm", "--user", stranger,
                "-v", f"{closed}:/run/secrets/worker.key_secret:ro", "-v", f"{keys / 'broker.key'}:/run/secrets/broker.key:ro",
                image, "worker", "--broker", "tcp://127.0.0.1:1",
                "--curve-secret", "/run/secrets/worker.key_secret", "--broker-key", "/run/secrets/broker.key",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert f"cannot read /run/secrets/worker.key_secret as uid {stranger}" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        _down(compose)
    _assert_nothing_left(project, image)


def _assert_nothing_left(project: str, image: str) -> None:
    """No container, network or volume of the compose project, nor its image, is left."""
    left = {
        kind: subprocess.run(
            [
                "docker",
                kind,
                "ls",
                *(["-a"] if kind == "container" else []),
                "-q",
                "--filter",
                f"label=com.docker.compose.project={project}",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        for kind in ("container", "network", "volume")
    }
    left["image"] = subprocess.run(["docker", "images", "-q", image], capture_output=True, text=True).stdout.strip()
    assert not any(left.values()), left


def _stop_seconds(container: str) -> float:
    """How long `docker stop` of a container takes (it kills after 10 s)."""
    start = time.monotonic()
    subprocess.run(["docker", "stop", container], check=True, capture_output=True, timeout=60)
    return time.monotonic() - start


def _health(container: str) -> str:
    return subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", container], capture_output=True, text=True
    ).stdout.strip()


def _workers(broker: str, curve: tuple[str, str] | None = None) -> int:
    try:
        return len(query(broker, curve, timeout=1.0)["workers"])
    except TimeoutError:
        return -1


def _down(compose) -> None:
    """Stops and removes the farm, its volumes and images, and the dangling images a build left."""
    down = compose("down", "-v", "--remove-orphans", "--rmi", "all")
    assert down.returncode == 0, down.stderr[-2000:]
    subprocess.run(
        ["docker", "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=envfarm"],
        capture_output=True,
    )
