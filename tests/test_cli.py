"""The `envfarm` command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


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
