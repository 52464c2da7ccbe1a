"""A farm across hosts: two worker hosts as network namespaces joined to this one by veth pairs,
one of them with a /dev/shm of its own so that it is truly remote. Needs root and iproute2; made
by the test and removed afterwards. Traffic goes only to the test's own namespaces."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
from compare import assert_same
from farms import assert_serves, running_broker, workers_of
from polling import wait_until

import envfarm

SUBNET = 40 + os.getpid() % 150  # 10.231.SUBNET.0/24 and 10.232.SUBNET.0/24: one run's own addresses
HEAD = f"10.231.{SUBNET}.1"  # this host, where the broker and the trainers run, as the worker hosts reach it


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=20)


def remove_stale_hosts() -> None:
    """Removes the namespaces and links of earlier runs whose test process is gone: one killed
    mid-test never ran its fixture's teardown."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    for pid, name in re.findall(r"^ef(\d+)([ab])\b", listed, re.M):
        if not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", f"ef{pid}{name}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"efh{pid}{name}"], capture_output=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("network namespaces need root, iproute2 and unshare")
    remove_stale_hosts()
    made = []
    try:
        for octet, name in ((231, "a"), (232, "b")):
            namespace, here, there = f"ef{os.getpid()}{name}", f"efh{os.getpid()}{name}", f"efw{os.getpid()}{name}"
            sh("ip", "netns", "add", namespace)
            made.append((namespace, here))
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            sh("ip", "link", "set", there, "netns", namespace)
            sh("ip", "addr", "add", f"10.{octet}.{SUBNET}.1/24", "dev", here)
            sh("ip", "link", "set", here, "up")
            sh("ip", "netns", "exec", namespace, "ip", "addr", "add", f"10.{octet}.{SUBNET}.2/24", "dev", there)
            sh("ip", "netns", "exec", namespace, "ip", "link", "set", there, "up")
            sh("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", namespace, "ip", "route", "add", "default", "via", f"10.{octet}.{SUBNET}.1")
    except (subprocess.SubprocessError, OSError) as e:
        for namespace, here in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            subprocess.run(["ip", "link", "del", here], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {e}")
    yield made
    for namespace, here in made:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


def remote_worker(namespace: str, port: str) -> list[str]:
    """A worker on host a: its own network and its own /dev/shm."""
    worker = f"{sys.executable} -m envfarm worker --slots 2 --broker tcp://10.231.{SUBNET}.1:{port}"
    return [
        "ip",
        "netns",
        "exec",
        namespace,
        "unshare",
        "-m",
        "sh",
        "-c",
        f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {worker}",
    ]


def same_host_worker(namespace: str, port: str) -> list[str]:
    """A worker on host b: its own network, but this host's memory."""
    return [
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-m",
        "envfarm",
        "worker",
        "--slots",
        "2",
        "--broker",
        f"tcp://10.232.{SUBNET}.1:{port}",
    ]


def test_trainer_with_a_remote_and_a_same_host_worker(hosts):
    (ns_a, link_a), (ns_b, _) = hosts
    with running_broker("tcp://0.0.0.0:0", dead_after=2.5) as broker:
        port = broker.endpoint.rsplit(":", 1)[1]
        with workers_of(broker, [remote_worker(ns_a, port), same_host_worker(ns_b, port)]) as (remote, same_host):
            envs = envfarm.make_vec("CartPole-v1", 4, broker=f"tcp://{HEAD}:{port}")
            sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
            try:
                by_pid = {w.pid: w for w in envs._workers}
                assert by_pid[remote.pid].shared_memory is False  # the nonce probe failed: observations on the wire
                assert by_pid[same_host.pid].shared_memory is True  # same memory, other network: shared memory
                assert_same(sync.reset(seed=9), envs.reset(seed=9))
                for actions in np.random.default_rng(1).integers(0, 2, (200, 4)):
                    assert_same(sync.step(actions), envs.step(actions))

                sh("ip", "link", "set", link_a, "down")  # cut host a off
                start = time.monotonic()
                with pytest.raises(envfarm.WorkerDiedError, match=rf"pid {remote.pid}.*was silent for more than 2.5 s"):
                    while True:
                        envs.step(envs.action_space.sample())
                assert time.monotonic() - start < 6
            finally:
                envs.close()
                sync.close()
            sh("ip", "link", "set", link_a, "up")  # heal: host a's worker comes back and registers again
            # It comes back still serving the closed trainer's lease: held until that trainer is
            # silent for dead_after, then freed.
            assert wait_until(
                lambda: len(broker.workers) == 2 and all(r.lessee is None for r in broker.workers.values()), 20
            ), "the cut-off worker did not come back"
            assert_serves(f"tcp://{HEAD}:{port}", 4)


def test_a_trainer_that_reaches_the_broker_by_loopback(hosts):
    # The common head-node setup: broker and trainer on one host, the trainer connecting to the
    # broker at 127.0.0.1, workers on two other hosts. They find the trainer at the broker's address.
    (ns_a, _), (ns_b, _) = hosts
    with running_broker("tcp://0.0.0.0:0", dead_after=2.5) as broker:
        port = broker.endpoint.rsplit(":", 1)[1]
        with workers_of(broker, [remote_worker(ns_a, port), same_host_worker(ns_b, port)]):
            assert_serves(f"tcp://127.0.0.1:{port}", 4)
            # A trainer listening where the workers cannot reach it: a clear error, within the start-up timeout.
            start = time.monotonic()
            with pytest.raises(
                multiprocessing.TimeoutError,
                match=r"2 leased farm worker\(s\) .*did not connect to this trainer at tcp://127\.0\.0\.1:\d+ within 5 s.*Pass listen=",
            ):
                envfarm.make_vec(
                    "CartPole-v1", 4, broker=f"tcp://127.0.0.1:{port}", listen="127.0.0.1", startup_timeout=5
                )
            assert time.monotonic() - start < 5 + 3
            assert wait_until(lambda: all(r.lessee is None for r in broker.workers.values()), 10), (
                "the failed trainer's lease was not released"
            )
            assert_serves(f"tcp://127.0.0.1:{port}", 4)


def test_two_trainers_and_a_restart_across_hosts(hosts):
    (ns_a, _), (ns_b, _) = hosts
    with running_broker("tcp://0.0.0.0:0", dead_after=2.5) as broker:
        port = broker.endpoint.rsplit(":", 1)[1]
        commands = [remote_worker(ns_a, port)] * 2 + [same_host_worker(ns_b, port)] * 2
        with workers_of(broker, commands):
            farm = f"tcp://{HEAD}:{port}"
            first = envfarm.make_vec("CartPole-v1", 2, broker=farm, on_failure="restart", shared_memory=False)
            second = envfarm.make_vec("CartPole-v1", 2, broker=farm)
            try:
                assert {w.identity for w in first._workers}.isdisjoint(w.identity for w in second._workers)
                first.reset(seed=0)
                second.reset(seed=1)
                os.kill(first._workers[0].pid, 9)  # kill -9 the first trainer's worker host process
                restarted = False
                deadline = time.monotonic() + 15
                while not restarted and time.monotonic() < deadline:
                    _, _, _, truncated, info = first.step(first.action_space.sample())
                    second.step(second.action_space.sample())  # the other trainer is not disturbed
                    restarted = "envfarm_restarted" in info
                assert restarted and truncated.all()
                for _ in range(20):
                    first.step(first.action_space.sample())
            finally:
                first.close()
                second.close()


HOSTILE = """
import os, sys, time, zmq
context = zmq.Context()
for endpoint in sys.argv[1:]:
    for identity in (b"W-hostile", b"T-hostile", b"stranger"):
        peer = context.socket(zmq.DEALER)
        peer.setsockopt(zmq.IDENTITY, identity)
        peer.setsockopt(zmq.LINGER, 2000)
        peer.connect(endpoint)
        for frames in ([b"\\xc1garbage"], [b"", b"\\x81\\xa1x" + b"\\x91" * 5000], [b"", b"\\xff" * 64, b"\\x00"], [os.urandom(32)], [b"", bytes(2 << 20)]):
            peer.send_multipart(frames)
        peer.close()
    huge = context.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(endpoint)
    huge.send_multipart([b"", bytes((1 << 30) + 1)])  # over both limits: the receiver drops this connection
    time.sleep(1)
    huge.close()
context.term()
"""


def test_faults_across_hosts(hosts):
    """Hostile frames from another host, a broker restart, a frozen and a killed worker: each
    outcome as documented, the other trainers untouched, nothing left behind."""
    (ns_a, _), (ns_b, _) = hosts
    with running_broker("tcp://0.0.0.0:0", dead_after=2.5) as broker:
        port = broker.endpoint.rsplit(":", 1)[1]
        farm = f"tcp://{HEAD}:{port}"
        with workers_of(broker, [remote_worker(ns_a, port)] * 3) as processes:
            envs = envfarm.make_vec("CartPole-v1", 4, broker=farm)
            sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
            rng = np.random.default_rng(3)
            try:
                assert_same(sync.reset(seed=4), envs.reset(seed=4))
                # Malformed and oversized frames, from host b, to the broker's port and the trainer's.
                hostile = subprocess.run(
                    ["ip", "netns", "exec", ns_b, sys.executable, "-c", HOSTILE, farm, envs._router.endpoint],
                    timeout=30,
                )
                assert hostile.returncode == 0
                for actions in rng.integers(0, 2, (50, 4)):
                    assert_same(sync.step(actions), envs.step(actions))

                # The broker restarts: training goes on, and the new broker learns the leases from the workers.
                broker.stop()
                time.sleep(0.5)
                with running_broker(f"tcp://0.0.0.0:{port}", dead_after=2.5) as again:
                    for actions in rng.integers(0, 2, (50, 4)):
                        assert_same(sync.step(actions), envs.step(actions))
                    assert wait_until(lambda: sum(r.lessee is not None for r in again.workers.values()) == 2, 15)

                    # A frozen worker is reported after dead_after.
                    victim = envs._workers[0]
                    frozen = next(p for p in processes if p.pid == victim.pid)
                    frozen.send_signal(signal.SIGSTOP)
                    start = time.monotonic()
                    with pytest.raises(
                        envfarm.WorkerDiedError, match=rf"pid {victim.pid}.*was silent for more than 2.5 s"
                    ):
                        while True:
                            envs.step(envs.action_space.sample())
                    assert time.monotonic() - start < 2.5 + 1.0
                    envs.close()
                    frozen.send_signal(signal.SIGCONT)  # back: it leaves the closed trainer's lease, and serves again
                    assert wait_until(
                        lambda: len(again.workers) == 3 and all(r.lessee is None for r in again.workers.values()), 15
                    )

                    # A killed worker is reported as soon as its connection drops.
                    second = envfarm.make_vec("CartPole-v1", 2, broker=farm)
                    try:
                        second.reset(seed=0)
                        os.kill(second._workers[0].pid, signal.SIGKILL)
                        start = time.monotonic()
                        with pytest.raises(envfarm.WorkerDiedError, match="lost its connection"):
                            while True:
                                second.step(second.action_space.sample())
                        assert time.monotonic() - start < 1.0
                    finally:
                        second.close()
            finally:
                envs.close()
                sync.close()
