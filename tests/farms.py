"""Farms for the tests: a broker in a thread, and worker processes registered with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Iterator

from polling import wait_until

import envfarm
from envfarm.server.broker import Broker


def assert_serves(broker: str, num_envs: int, env_id: str = "CartPole-v1", **options: Any) -> None:
    """A trainer leases `num_envs` envs from the farm, resets and steps them once, and closes."""
    envs = envfarm.make_vec(env_id, num_envs, broker=broker, **options)
    try:
        envs.reset(seed=0)
        envs.step(envs.action_space.sample())
    finally:
        envs.close()


@contextlib.contextmanager
def running_broker(bind: str = "tcp://127.0.0.1:0", **options: Any) -> Iterator[Broker]:
    broker = Broker(bind, **options)
    thread = threading.Thread(target=broker.serve, daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        broker.stop()
        thread.join(5)


@contextlib.contextmanager
def workers_of(broker: Broker, commands: list[list[str]]) -> Iterator[list[subprocess.Popen]]:
    """Starts one worker process per command, waits until all registered, kills them afterwards."""
    processes = [subprocess.Popen(command, stderr=subprocess.DEVNULL) for command in commands]
    try:
        assert wait_until(lambda: len(broker.workers) >= len(commands), 30), "workers did not register"
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(10)


def worker_command(broker: str, slots: int, *options: str) -> list[str]:
    """The command line of a farm worker process of `slots` slots serving `broker`."""
    return [sys.executable, "-m", "envfarm", "worker", "--broker", broker, "--slots", str(slots), *options]


@contextlib.contextmanager
def start_farm(
    workers: int, slots: int, *worker_options: str, **broker_options: Any
) -> Iterator[tuple[Broker, list[subprocess.Popen]]]:
    """A broker on 127.0.0.1 and `workers` local worker processes of `slots` slots each."""
    with running_broker(**broker_options) as broker:
        command = worker_command(broker.endpoint, slots, *worker_options)
        with workers_of(broker, [command] * workers) as processes:
            yield broker, processes


@contextlib.contextmanager
def cpu_hogs(per_cpu: int = 2) -> Iterator[list[subprocess.Popen]]:
    """`per_cpu` busy processes per CPU beside the test, as a training process that uses every core;
    each stops by itself after 10 minutes should the test's own cleanup never run."""
    count = per_cpu * (os.cpu_count() or 1)
    code = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)
