"""The `envfarm` command line, as a user runs it."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback


def envfarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envfarm", *args], capture_output=True, text=True, timeout=timeout)


def test_run_reports_a_summary():
    result = envfarm("run", "CartPole-v1", "--num-envs", "4", "--steps", "3000", "--num-workers", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["env_id"] == "CartPole-v1" and summary["num_envs"] == 4 and summary["num_workers"] == 2
    assert summary["steps"] >= 3000
    assert summary["episodes"] > 50  # a random CartPole episode lasts about 22 steps
    assert 8 < summary["mean_return"] < 60
    assert summary["steps_per_second"] > 0
    assert "3000/3000 steps" in result.stderr  # the progress line


def test_run_prints_a_readable_summary():
    result = envfarm("run", "CartPole-v1", "--num-envs", "2", "--steps", "500")
    assert result.returncode == 0, result.stderr
    for word in ("episodes", "mean return", "throughput", "steps/s"):
        assert word in result.stdout


def test_unknown_env_is_one_clear_line():
    result = envfarm("run", "NoSuchEnv-v0", "--steps", "10")
    assert result.returncode == 2
    assert "NoSuchEnv" in result.stderr and "Traceback" not in result.stderr


def test_bad_arguments_are_refused():
    assert envfarm("run", "CartPole-v1", "--num-envs", "0").returncode == 2
    result = envfarm("run", "CartPole-v1", "--env-kwargs", "[1]")
    assert result.returncode == 2 and "JSON object" in result.stderr


def test_broker_and_worker_stop_on_sigterm_even_as_pid_1():
    # `docker stop` sends SIGTERM; a process that is PID 1 (its own PID namespace here, as in a
    # container without an init) ignores it unless it handles it.
    import shutil
    import signal
    import time

    pid_1 = ["unshare", "--pid", "--fork", "--kill-child"] if shutil.which("unshare") and os.geteuid() == 0 else []
    broker = subprocess.Popen(
        [*pid_1, sys.executable, "-m", "envfarm", "broker", "--bind", "tcp://127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        endpoint = broker.stderr.readline().split()[-1]
        worker = subprocess.Popen(
            [*pid_1, sys.executable, "-m", "envfarm", "worker", "--broker", endpoint, "--slots", "1"],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)  # it registers
        for process in (worker, broker):
            target = _innermost(process.pid) if pid_1 else process.pid
            start = time.monotonic()
            os.kill(target, signal.SIGTERM)
            process.wait(10)
            assert time.monotonic() - start < 2.0 and process.returncode == 0
    finally:
        for process in (worker, broker):
            if process is not None:
                process.kill()
                process.wait(10)


def _innermost(pid: int) -> int:
    """The process unshare forked to run the command: PID 1 of the new namespace."""
    for _ in range(100):
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            found = children.read().split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError("unshare started nothing")


def test_broker_and_worker_log_registrations_and_leases():
    import envfarm

    broker = subprocess.Popen(
        [sys.executable, "-m", "envfarm", "broker", "--bind", "tcp://127.0.0.1:0"], stderr=subprocess.PIPE, text=True
    )
    worker = None
    try:
        endpoint = broker.stderr.readline().split()[-1]
        worker = subprocess.Popen(
            [sys.executable, "-m", "envfarm", "worker", "--broker", endpoint, "--slots", "2"],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        envfarm.make_vec("CartPole-v1", 2, broker=endpoint).close()
        time.sleep(1.0)
    finally:
        for process in (worker, broker):
            if process is not None:
                process.terminate()
    broker_log, worker_log = broker.communicate(timeout=10)[1], worker.communicate(timeout=10)[1]
    for expected in (
        "INFO worker",
        "registered: ",
        "2 slots",
        "leased",
        "for 2 envs of CartPole-v1",
        "released its workers",
    ):
        assert expected in broker_log, broker_log
    for expected in ("INFO lease", "serving trainer", "ended"):
        assert expected in worker_log, worker_log


def test_keygen_writes_several_pairs_for_a_containers_user(tmp_path):
    result = envfarm("keygen", str(tmp_path), "broker", "worker", "trainer")
    assert result.returncode == 0, result.stderr
    for name in ("broker", "worker", "trainer"):
        assert os.stat(tmp_path / f"{name}.key_secret").st_mode & 0o777 == 0o600
        assert (tmp_path / f"{name}.key").exists()
    # --owner: the files go to the user a container runs as (giving them away takes root).
    owner = 1000 if os.geteuid() == 0 else os.geteuid()
    result = envfarm("keygen", str(tmp_path / "given"), "worker", "--owner", str(owner))
    assert result.returncode == 0, result.stderr
    secret = os.stat(tmp_path / "given" / "worker.key_secret")
    assert secret.st_uid == owner and secret.st_mode & 0o777 == 0o600
    if os.geteuid() != 0:
        refused = envfarm("keygen", str(tmp_path / "refused"), "worker", "--owner", str(os.geteuid() + 1))
        assert refused.returncode == 2 and "only root may give files to another user" in refused.stderr
        assert not (tmp_path / "refused" / "worker.key_secret").exists()  # no key left behind
    assert envfarm("keygen", str(tmp_path), "x", "--owner", "someone").returncode == 2


def test_a_key_its_user_cannot_read_is_one_line_naming_the_file_and_the_uid(tmp_path):
    """A compose secret keeps the host's owner and mode: a 0600 key of another user is unreadable
    in the container. Said at once, before anything starts, instead of a traceback."""
    from envfarm.cli import build_parser, main

    assert envfarm("keygen", str(tmp_path), "worker", "broker").returncode == 0
    secret = str(tmp_path / "worker.key_secret")
    command = ["worker", "--broker", "tcp://127.0.0.1:1", "--curve-secret", secret, "--broker-key"]
    command.append(str(tmp_path / "broker.key"))
    if os.geteuid() != 0:
        os.chmod(secret, 0)
        result = envfarm(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"envfarm worker: cannot read {secret} as uid {os.geteuid()} (it is uid {os.geteuid()}'s, mode 0000): "
            f"give it to this user (chown {os.geteuid()} FILE, or envfarm keygen --owner {os.geteuid()} as root), "
            f"or run this process as uid {os.geteuid()} (compose: ENVFARM_UID)"
        )
        return
    # As root, which reads everything: a child that became uid 1000, as in the image. What it
    # imports is imported here first (this interpreter may live where uid 1000 cannot read).
    build_parser()
    importlib.import_module("envfarm.transport.curve")
    open_folder = tempfile.mkdtemp()  # tmp_path's parents are closed to others
    os.chmod(open_folder, 0o755)
    for name in ("worker.key_secret", "broker.key"):
        shutil.copy2(tmp_path / name, open_folder)
    secret = os.path.join(open_folder, "worker.key_secret")
    command[command.index("--curve-secret") + 1] = secret
    command[-1] = os.path.join(open_folder, "broker.key")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        code = 99
        sys.stderr = os.fdopen(write, "w")  # not fd 2: pytest captures sys.stderr apart from it
        try:
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
            code = main(command)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stderr:
        message = stderr.read()
    shutil.rmtree(open_folder)
    assert os.waitpid(child, 0)[1] >> 8 == 2, message
    assert message.strip() == (
        f"envfarm worker: cannot read {secret} as uid 1000 (it is uid 0's, mode 0600): "
        "give it to this user (chown 1000 FILE, or envfarm keygen --owner 1000 as root)"
    )  # never advised to run as root


def test_status_and_run_reach_a_curve_farm_with_keys_from_flags_or_the_environment(tmp_path):
    """A container's health check runs `envfarm status --broker ...` unchanged with Curve on: the
    keys come from ENVFARM_CURVE_SECRET and ENVFARM_BROKER_KEY. `envfarm run` takes them as flags."""
    keys = str(tmp_path)
    assert envfarm("keygen", keys, "broker", "worker", "trainer").returncode == 0
    for role, name in (("workers", "worker"), ("trainers", "trainer"), ("admins", "broker")):
        os.makedirs(f"{keys}/clients/{role}")
        os.link(f"{keys}/{name}.key", f"{keys}/clients/{role}/{name}.key")
    broker = subprocess.Popen(
        [sys.executable, "-m", "envfarm", "broker", "--bind", "tcp://127.0.0.1:0"]
        + ["--curve-secret", f"{keys}/broker.key_secret", "--curve-clients", f"{keys}/clients"],
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        endpoint = broker.stderr.readline().split()[-1]
        worker = subprocess.Popen(
            [sys.executable, "-m", "envfarm", "worker", "--broker", endpoint, "--slots", "2"]
            + ["--curve-secret", f"{keys}/worker.key_secret", "--broker-key", f"{keys}/broker.key"],
            stderr=subprocess.DEVNULL,
        )
        as_admin = {**os.environ, "ENVFARM_CURVE_SECRET": f"{keys}/broker.key_secret"}
        as_admin["ENVFARM_BROKER_KEY"] = f"{keys}/broker.key"
        status = [sys.executable, "-m", "envfarm", "status", "--broker", endpoint, "--json"]
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(status, env=as_admin, capture_output=True, text=True, timeout=60)
            if result.returncode == 0 and json.loads(result.stdout)["workers"]:
                break
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.2)
        half = envfarm("status", "--broker", endpoint, "--curve-secret", f"{keys}/trainer.key_secret")
        assert half.returncode == 2 and "go together" in half.stderr
        run = envfarm(
            "run", "CartPole-v1", "--num-envs", "2", "--steps", "200", "--broker", endpoint, "--json",
            "--curve-secret", f"{keys}/trainer.key_secret", "--broker-key", f"{keys}/broker.key",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["steps"] >= 200
    finally:
        for process in (worker, broker):
            if process is not None:
                process.terminate()
                process.wait(10)


def test_status_stops_calling_a_killed_worker_free_as_the_broker_stops_leasing_it():
    """The broker strikes a killed worker off after --dead-after (5 s); it leases out only workers
    heard from within 2.5 heartbeats, and `envfarm status` says "free" by the same rule."""
    import signal

    broker = subprocess.Popen(
        [sys.executable, "-m", "envfarm", "broker", "--bind", "tcp://127.0.0.1:0"], stderr=subprocess.PIPE, text=True
    )
    workers = []
    try:
        endpoint = broker.stderr.readline().split()[-1]
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "envfarm", "worker", "--broker", endpoint, "--slots", "1"],
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 30
        while "2 free" not in (status := envfarm("status", "--broker", endpoint)).stdout:
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(0.2)
        workers[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while "1 free, 1 silent" not in (status := envfarm("status", "--broker", endpoint)).stdout:
            assert time.monotonic() - killed < 4.5, status.stdout  # before the broker strikes it off at 5 s
            time.sleep(0.1)
        assert status.stdout.startswith("2 workers, 2 slots"), status.stdout
        lines = status.stdout.splitlines()[1:]
        assert sum("slots  free " in line for line in lines) == sum("slots  silent " in line for line in lines) == 1
    finally:
        for process in (*workers, broker):
            process.kill()
            process.wait(10)
