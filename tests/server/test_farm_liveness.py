"""A farm on loopback: every verdict of lost is true and comes within its deadline, and no
healthy worker is taken for lost (a long step, a long build, a loaded machine, a lost message)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from compare import assert_same
from farms import assert_serves, cpu_hogs, running_broker, start_farm, worker_command
from polling import wait_until

import envfarm
from envfarm.protocol import messages as m
from envfarm.server.broker import Broker


@pytest.mark.parametrize(
    "fault, outcome, within",
    [
        (signal.SIGKILL, "lost its connection", 1.0),  # its host closes the connection: a probe finds it gone
        (signal.SIGSTOP, "was silent for more than 2.5 s", 2.5 + 1.0),  # dead_after, and one look more
    ],
    ids=["kill", "freeze"],
)
def test_a_lost_worker_is_reported_within_the_deadline(quick_farm, fault, outcome, within):
    broker, processes = quick_farm
    envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, shared_memory=False)
    try:
        envs.reset(seed=0)
        victim = next(w for w in envs._workers if w.pid == processes[1].pid)
        processes[1].send_signal(fault)
        start = time.monotonic()
        with pytest.raises(envfarm.WorkerDiedError, match=rf"worker {victim.index} \(.*pid {victim.pid}.*{outcome}"):
            while True:
                envs.step(envs.action_space.sample())
        assert time.monotonic() - start < within
    finally:
        envs.close()


def test_envs_that_take_longer_than_dead_after_to_build_are_waited_for(quick_farm):
    from envfarm.bench_envs import SYNTHETIC_ID

    broker, _ = quick_farm  # dead_after 2.5 s; building sends no heartbeats, startup_timeout bounds it
    assert_serves(broker.endpoint, 2, SYNTHETIC_ID, env_kwargs={"build_seconds": 2.0, "obs_shape": [4]})


def test_a_frozen_worker_that_comes_back_registers_again(quick_farm):
    broker, processes = quick_farm
    processes[0].send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while len(broker.workers) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(broker.workers) == 1
    processes[0].send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while len(broker.workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(broker.workers) == 2
    assert_serves(broker.endpoint, 4)


def test_a_vanished_trainer_loses_its_lease(quick_farm):
    broker, _ = quick_farm
    code = (
        "import envfarm, sys; envs = envfarm.make_vec('CartPole-v1', 4, broker=sys.argv[1]); envs.reset(seed=0);"
        "print('leased', flush=True); import time; time.sleep(60)"
    )
    trainer = subprocess.Popen([sys.executable, "-c", code, broker.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "leased"
        assert all(record.lessee is not None for record in broker.workers.values())
        time.sleep(3)  # a live trainer keeps its lease while its thread sleeps: it sends heartbeats
        assert all(record.lessee is not None for record in broker.workers.values())
        trainer.kill()
        trainer.wait(10)
        assert wait_until(lambda: all(r.lessee is None for r in broker.workers.values()), 2.5 + 3)
        assert_serves(broker.endpoint, 4)  # the whole farm is free again
    finally:
        trainer.kill()
        trainer.wait(10)


def test_a_multi_process_worker_replaces_a_dead_process_and_reports_its_health(tmp_path):
    alive = tmp_path / "alive"
    with running_broker(dead_after=2.5) as broker:
        command = worker_command(broker.endpoint, 2, "--processes", "2", "--alive-file", str(alive))
        host = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: len(broker.workers) == 2, 30), "the two worker processes did not register"
            healthy = subprocess.run([sys.executable, "-m", "envfarm", "alive", str(alive)], timeout=30)
            assert healthy.returncode == 0
            first = {record.pid for record in broker.workers.values()}
            os.kill(min(first), signal.SIGKILL)  # an env crashed its process
            assert wait_until(
                lambda: len({r.pid for r in broker.workers.values()} - first) == 1 and len(broker.workers) == 2, 20
            )
            assert_serves(broker.endpoint, 4)  # both serve
        finally:
            host.terminate()  # `docker stop`: the children go with it
            host.wait(10)
        assert "exited with code -9; starting another" in host.stderr.read()
        children = {record.pid for record in broker.workers.values()}
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), 10), (
            "a worker process outlived its parent"
        )
        time.sleep(1)
        stale = subprocess.run([sys.executable, "-m", "envfarm", "alive", str(alive), "--within", "0.5"], timeout=30)
        assert stale.returncode == 1


def test_a_worker_in_a_long_step_stays_healthy(tmp_path):
    # The container health check (`envfarm alive FILE --within 10`) must not call a worker dead
    # for one env step longer than its window: the kubelet would restart a healthy worker.
    from envfarm.bench_envs import SYNTHETIC_ID

    alive = tmp_path / "alive"
    with start_farm(1, 2, "--alive-file", str(alive), dead_after=2.5) as (broker, _):
        envs = envfarm.make_vec(
            SYNTHETIC_ID,
            2,
            broker=broker.endpoint,
            shared_memory=False,
            env_kwargs={"step_cost_us": 2_000_000, "obs_shape": [4]},
        )
        try:
            envs.reset(seed=0)
            envs.step_async(envs.action_space.sample())  # 4 s: two envs of 2 s each
            time.sleep(3.0)
            healthy = subprocess.run(
                [sys.executable, "-m", "envfarm", "alive", str(alive), "--within", "2"], timeout=30
            )
            assert healthy.returncode == 0, "a worker in a long step was reported unhealthy"
            envs.step_wait(timeout=30)
        finally:
            envs.close()


def test_a_request_lost_on_the_way_is_not_waited_for(quick_farm):
    # The network resetting a connection loses what was in flight. The trainer's probe travels
    # behind the requests on the same connection; the worker's heartbeat says it read the probe but
    # not the request: proof that it was lost, found without waiting for dead_after.
    broker, _ = quick_farm
    envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, shared_memory=False)
    try:
        envs.reset(seed=0)
        router, worker = envs._router, envs._workers[0]
        worker.route.sent_on_socket += 1  # as if one more request had been sent, and lost
        rid = router.new_rid()
        start = time.monotonic()
        with pytest.raises(envfarm.WorkerDiedError, match=r"lost a request \(its connection was reset on the way\)"):
            router.gather(rid, [worker], None)  # no timeout: only the probe and heartbeats can end this wait
        assert time.monotonic() - start < 0.25 + 1.0 + 1.0  # a probe, the next heartbeat, slack for a loaded host
    finally:
        envs.close()


def test_a_reply_lost_on_the_way_back_is_sent_again(quick_farm):
    # A reset can lose a reply too. The worker read the request and answered, so nothing proves a
    # loss and it heartbeats on: the trainer's probe names the reply it awaits, and the worker sends
    # it again. Played here by a trainer that drops the first step reply it receives.
    broker, _ = quick_farm
    envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, shared_memory=False)
    sync = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")
    try:
        assert_same(sync.reset(seed=3), envs.reset(seed=3))
        router, accept, dropped = envs._router, envs._router._accept, []

        def lossy(worker, message, pending, replies):
            if message.get("kind") == m.RESULT and not dropped:
                dropped.append(message["rid"])
                return
            accept(worker, message, pending, replies)

        router._accept = lossy
        actions = np.array([0, 1])
        start = time.monotonic()
        envs.step_async(actions)
        result = envs.step_wait(timeout=30)  # without the second sending, only this timeout would end it
        assert dropped and time.monotonic() - start < 2 * m.HEARTBEAT_INTERVAL + 2.0
        assert_same(sync.step(actions), result)
    finally:
        envs.close()
        sync.close()


def test_a_step_longer_than_dead_after_is_not_taken_for_silence(quick_farm):
    from envfarm.bench_envs import SYNTHETIC_ID

    broker, _ = quick_farm  # dead_after 2.5 s; each step takes 3.5 s, the trainer pausing between steps
    envs = envfarm.make_vec(
        SYNTHETIC_ID,
        2,
        broker=broker.endpoint,
        shared_memory=False,
        env_kwargs={"step_cost_us": 3_500_000, "obs_shape": [4]},
    )
    try:
        envs.reset(seed=0)
        for _ in range(2):
            time.sleep(1.2)  # heartbeats queue up while the trainer is away
            envs.step(envs.action_space.sample())
    finally:
        envs.close()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["wire", "shm"])
def test_no_false_verdict_under_cpu_oversubscription(shared_memory):
    # A trainer pausing 1-50 ms between steps (a policy), with default liveness settings and two
    # busy processes per CPU beside the farm: every verdict must be true, so there must be none.
    with start_farm(2, 4) as (broker, _), cpu_hogs(2):
        envs = envfarm.make_vec(
            "CartPole-v1", 8, broker=broker.endpoint, shared_memory=shared_memory, on_failure="raise"
        )
        try:
            envs.reset(seed=0)
            pauses = np.random.default_rng(0).choice([0.001, 0.005, 0.01, 0.05], 10_000)
            end, steps = time.monotonic() + 20, 0
            while time.monotonic() < end:
                envs.step(envs.action_space.sample())
                time.sleep(pauses[steps])
                steps += 1
            assert steps > 50
        finally:
            envs.close()


def test_an_idle_worker_out_of_the_brokers_reach_says_so_and_is_unhealthy_until_it_is_back(tmp_path):
    alive = tmp_path / "alive"
    broker = Broker("tcp://127.0.0.1:0")
    port = broker.endpoint.rsplit(":", 1)[1]
    thread = threading.Thread(target=broker.serve, daemon=True)
    thread.start()
    command = worker_command(broker.endpoint, 2, "--alive-file", str(alive), "--broker-grace", "1")
    host = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    check = [sys.executable, "-m", "envfarm", "alive", str(alive), "--within", "1.5"]
    try:
        assert wait_until(lambda: len(broker.workers) == 1, 30), "the worker did not register"
        assert subprocess.run(check, timeout=30).returncode == 0
        broker.stop()
        thread.join(5)
        assert wait_until(lambda: subprocess.run(check, timeout=30).returncode == 1, 15), (
            "a worker that cannot reach its broker stayed healthy"
        )
        broker = Broker(f"tcp://127.0.0.1:{port}")  # the broker comes back where it was
        thread = threading.Thread(target=broker.serve, daemon=True)
        thread.start()
        assert wait_until(lambda: len(broker.workers) == 1, 30), "the worker did not register again"
        assert wait_until(lambda: subprocess.run(check, timeout=30).returncode == 0, 15), (
            "the worker stayed unhealthy with its broker back"
        )
    finally:
        host.terminate()
        host.wait(10)
        broker.stop()
        thread.join(5)
    log = host.stderr.read()
    assert "lost; reconnecting" in log and "out of reach for 1 s" in log and "reached" in log


def test_each_process_of_a_worker_has_its_own_alive_file_so_one_stuck_process_is_seen(tmp_path):
    alive = tmp_path / "alive"
    with running_broker() as broker:
        command = worker_command(broker.endpoint, 2, "--processes", "2", "--alive-file", str(alive))
        host = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        check = [sys.executable, "-m", "envfarm", "alive", str(alive), "--within", "3"]
        try:
            assert wait_until(lambda: len(broker.workers) == 2, 30), "the two worker processes did not register"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["alive.0", "alive.1"]
            assert subprocess.run(check, timeout=30).returncode == 0
            stuck = min(record.pid for record in broker.workers.values())
            os.kill(stuck, signal.SIGSTOP)  # stuck: alive to the kernel, serving nobody
            try:
                assert wait_until(lambda: subprocess.run(check, timeout=30).returncode == 1, 15), (
                    "one stuck process was hidden by the other"
                )
            finally:
                os.kill(stuck, signal.SIGCONT)
        finally:
            host.terminate()
            host.wait(10)
