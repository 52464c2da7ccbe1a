"""A farm on loopback: a broker, worker processes that register with it, and trainers that lease them."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import zmq
import zmq.auth
from compare import assert_same
from farms import assert_serves, cpu_hogs, running_broker, start_farm, worker_command, workers_of
from polling import wait_until

import envfarm
from envfarm.client.broker_link import query
from envfarm.protocol import messages as m
from envfarm.protocol.packing import pack, unpack
from envfarm.server.broker import Broker


@pytest.fixture
def farm():
    """Three 4-slot workers."""
    with start_farm(3, 4) as (broker, _):
        yield broker


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_a_farm_trainer_matches_sync(farm, shared_memory):
    envs = envfarm.make_vec("CartPole-v1", 6, broker=farm.endpoint, shared_memory=shared_memory)
    sync = gym.make_vec("CartPole-v1", 6, vectorization_mode="sync")
    try:
        assert envs.num_workers == 2 and all(w.shared_memory == shared_memory for w in envs._workers)
        assert_same(sync.reset(seed=5), envs.reset(seed=5))
        for actions in np.random.default_rng(0).integers(0, 2, (150, 6)):
            assert_same(sync.step(actions), envs.step(actions))
    finally:
        envs.close()
        sync.close()


def test_closing_a_healthy_farm_trainer_is_quiet(farm):
    # A worker that answered CLOSE closes its sockets at once: its reply, already here, is life,
    # never "lost its connection". Seen falsely in 6 of 20 closes before.
    for shared_memory in [True, False] * 5:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            envs = envfarm.make_vec("CartPole-v1", 8, broker=farm.endpoint, shared_memory=shared_memory)
            envs.reset(seed=0)
            envs.step(envs.action_space.sample())
            envs.close()
        assert [str(w.message) for w in caught if "envfarm" in str(w.message)] == []


def test_two_trainers_share_the_farm_and_leases_come_back(farm):
    first = envfarm.make_vec("CartPole-v1", 8, broker=farm.endpoint)
    second = envfarm.make_vec("CartPole-v1", 4, broker=farm.endpoint)
    try:
        assert {w.identity for w in first._workers}.isdisjoint(w.identity for w in second._workers)
        with pytest.raises(RuntimeError, match="the farm has 0 free slots for 'CartPole-v1', 4 were asked for"):
            envfarm.make_vec("CartPole-v1", 4, broker=farm.endpoint, startup_timeout=10)
        first.reset(seed=0)
        second.reset(seed=1)
        first.step(first.action_space.sample())
        second.step(second.action_space.sample())
    finally:
        first.close()
        second.close()
    assert_serves(farm.endpoint, 12)  # every slot is free again


def test_farm_workers_take_no_code(farm):
    with pytest.raises(ValueError, match="wrappers cannot be sent"):
        envfarm.make_vec("CartPole-v1", 2, broker=farm.endpoint, wrappers=[gym.wrappers.RecordEpisodeStatistics])
    with pytest.raises(Exception, match="'module:Env' ids import code"):
        envfarm.make_vec(
            gym.envs.registration.EnvSpec("os:Nothing-v0", entry_point="os:getcwd"), 2, broker=farm.endpoint
        )
    assert_serves(farm.endpoint, 2)  # the farm still serves


def test_malformed_frames_do_not_hurt_the_broker(farm):
    context = zmq.Context()
    try:
        for identity in (b"W-hostile", b"T-hostile", b"X-stranger"):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.IDENTITY, identity)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(farm.endpoint)
            for frames in (
                [b"\xc1garbage"],
                [b"", b"\x81\xa1x" + b"\x91" * 5000],
                [b"", b"\xff" * 64, b"\x00"],
                [os.urandom(32)],
            ):
                peer.send_multipart(frames)
            peer.close()
        trainer = context.socket(zmq.DEALER)
        trainer.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + b"probe")
        trainer.setsockopt(zmq.LINGER, 0)
        trainer.connect(farm.endpoint)
        trainer.send_multipart([b"", b"\x93\x01\x02\x03"])  # a header that is not a map
        assert trainer.poll(5000)
        delimiter, *reply = trainer.recv_multipart()
        assert delimiter == b"" and unpack(reply)["kind"] == m.ERROR
        for endpoint, key in (
            ("tcp://no port", None),
            ("ipc:///tmp/x", None),
            ("tcp://127.0.0.1:9", "short"),
        ):  # nothing a worker could join
            trainer.send_multipart(
                [b"", *pack(m.make(m.LEASE, 7, envs=2, env_id="CartPole-v1", endpoint=endpoint, server_key=key))]
            )
            assert trainer.poll(5000)
            _, *reply = trainer.recv_multipart()
            assert unpack(reply)["kind"] == m.ERROR
        trainer.close()
    finally:
        context.term()
    assert_serves(farm.endpoint, 4)


@pytest.fixture
def quick_farm():
    """Two 2-slot workers, declared lost after 2.5 s of silence; yields (broker, worker processes)."""
    with start_farm(2, 2, dead_after=2.5) as farm:
        yield farm


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


def test_workers_are_leased_only_for_the_envs_they_allow():
    with running_broker() as broker:
        worker = worker_command(broker.endpoint, 2)
        with workers_of(broker, [worker + ["--allow", "Pendulum-*"], worker]):
            restricted = next(r.identity for r in broker.workers.values() if r.allow == ["Pendulum-*"])
            with pytest.raises(
                RuntimeError,
                match=r"the farm has 2 free slots for 'CartPole-v1' \(and 2 for other env ids\), 4 were asked for",
            ):
                envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint)
            cartpole = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint)  # the unrestricted worker
            pendulum = envfarm.make_vec("Pendulum-v1", 2, broker=broker.endpoint)  # the one that allows it
            try:
                assert [w.identity for w in pendulum._workers] == [restricted]
                for envs in (cartpole, pendulum):
                    envs.reset(seed=0)
                    envs.step(envs.action_space.sample())
            finally:
                cartpole.close()
                pendulum.close()


def test_a_worker_refuses_ids_it_does_not_allow_even_if_asked_directly():
    from envfarm.server.request_handler import RequestHandler

    handler = RequestHandler(trusted=False, allow=["Pendulum-*"])
    create = {
        "kind": "create",
        "rid": 1,
        "envs": [0],
        "source": {"env_id": "CartPole-v1", "kwargs": {}},
        "autoreset_mode": "NextStep",
    }
    reply = handler.respond(create)
    assert (
        reply["kind"] == "error"
        and "'CartPole-v1' is not allowed on this worker (--allow Pendulum-*)" in reply["error"]["message"]
    )


def test_curve_admits_listed_keys_and_refuses_the_others(tmp_path):
    from envfarm.transport.curve import keygen

    keygen(str(tmp_path), "broker")
    clients = tmp_path / "clients"
    for name in ("worker", "trainer"):
        public, _ = keygen(str(tmp_path), name)
        clients.mkdir(exist_ok=True)
        (clients / f"{name}.key").write_bytes(open(public, "rb").read())
    keygen(str(tmp_path), "stranger")
    broker_key = str(tmp_path / "broker.key")
    worker_curve = ("--curve-secret", str(tmp_path / "worker.key_secret"), "--broker-key", broker_key)
    with start_farm(1, 2, *worker_curve, curve=(str(tmp_path / "broker.key_secret"), str(clients))) as (broker, _):
        envs = envfarm.make_vec(
            "CartPole-v1", 2, broker=broker.endpoint, curve=(str(tmp_path / "trainer.key_secret"), broker_key)
        )
        try:
            envs.reset(seed=0)
            # Peers posing as the leased worker on the trainer's data port, in plaintext and with a
            # key the trainer did not lease: refused, so their garbage never reaches the trainer
            # (which would take it for the worker's, and fail).
            context = zmq.Context()
            for keys in (None, zmq.auth.load_certificate(str(tmp_path / "stranger.key_secret"))):
                impostor = context.socket(zmq.DEALER)
                impostor.setsockopt(zmq.IDENTITY, envs._workers[0].identity)
                impostor.setsockopt(zmq.LINGER, 0)
                if keys is not None:
                    impostor.curve_publickey, impostor.curve_secretkey = keys
                    impostor.curve_serverkey = zmq.auth.load_certificate(str(tmp_path / "trainer.key"))[0]
                impostor.connect(envs._router.endpoint)
                impostor.send_multipart([b"\xc1garbage"])
                time.sleep(0.5)
                impostor.close()
            context.term()
            for _ in range(20):
                envs.step(envs.action_space.sample())
            # A listed key speaking under the trainer's identity to the broker: ignored.
            context = zmq.Context()
            impostor = context.socket(zmq.DEALER)
            impostor.setsockopt(zmq.IDENTITY, envs._pool.broker.socket.getsockopt(zmq.IDENTITY))
            impostor.setsockopt(zmq.LINGER, 0)
            impostor.curve_publickey, impostor.curve_secretkey = zmq.auth.load_certificate(
                str(tmp_path / "worker.key_secret")
            )
            impostor.curve_serverkey = zmq.auth.load_certificate(broker_key)[0]
            impostor.connect(broker.endpoint)
            impostor.send_multipart([b"", *pack(m.make(m.RELEASE, 1))])
            time.sleep(1)
            impostor.close()
            context.term()
            assert all(record.lessee is not None for record in broker.workers.values())  # the lease stands
            envs.step(envs.action_space.sample())
        finally:
            envs.close()
        for curve in ((str(tmp_path / "stranger.key_secret"), broker_key), None):  # unlisted, then plaintext
            with pytest.raises(multiprocessing.TimeoutError, match="is this trainer's public key among its clients"):
                envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, curve=curve, startup_timeout=2)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "freeze"])
def test_restart_policy_rebuilds_lost_envs_on_a_spare_worker(farm, fault):
    # farm: three 4-slot workers; the trainer leases two, the third is the spare. A killed
    # worker's connection drops (the next send finds it gone); a frozen one goes silent.
    envs = envfarm.make_vec("CartPole-v1", 8, broker=farm.endpoint, on_failure="restart", shared_memory=False)
    try:
        envs.reset(seed=0)
        victim = envs._workers[1]
        os.kill(victim.pid, fault)
        time.sleep(0.5)
        restarted = None
        deadline = time.monotonic() + 20
        while restarted is None and time.monotonic() < deadline:
            _, _, _, truncated, info = envs.step(envs.action_space.sample())
            if "envfarm_restarted" in info:
                restarted = (truncated, info)
        assert restarted is not None, "the lost worker's envs were not restarted"
        truncated, info = restarted
        assert info["_envfarm_restarted"].tolist() == [False] * 4 + [True] * 4
        assert truncated[4:].all()
        assert envs._workers[1].pid != victim.pid
        # NEXT_STEP: the step after an end is Gymnasium's autoreset step: a reset, reward 0, no end
        obs, rewards, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert rewards[4:].tolist() == [0.0] * 4 and not terminated[4:].any() and not truncated[4:].any()
        rewards = envs.step(envs.action_space.sample())[1]
        assert rewards[4:].tolist() == [1.0] * 4  # and then it steps as any env
        for _ in range(20):  # training goes on
            envs.step(envs.action_space.sample())
        with pytest.raises(ValueError, match="needs a farm"):
            envfarm.make_vec("CartPole-v1", 2, on_failure="restart")
    finally:
        envs.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_a_restart_under_same_step_gives_every_truncated_env_a_final_obs(farm, shared_memory):
    # Under SAME_STEP a learner bootstraps from info["final_obs"][i] for every truncated env i;
    # a restarted env is truncated too, so it must have one (before, a KeyError in the learner).
    envs = envfarm.make_vec(
        "CartPole-v1",
        8,
        broker=farm.endpoint,
        on_failure="restart",
        shared_memory=shared_memory,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    try:
        envs.reset(seed=0)
        victim = envs._workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        info: dict = {}
        while "envfarm_restarted" not in info and time.monotonic() < deadline:
            obs, _, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert "envfarm_restarted" in info, "the lost worker's envs were not restarted"
        ended = np.flatnonzero(terminated | truncated)
        assert set(range(4, 8)) <= set(ended.tolist())
        assert info["_final_obs"][ended].all() and info["_final_info"][ended].all()
        for i in range(4, 8):
            assert info["final_obs"][i].shape == envs.single_observation_space.shape
            np.testing.assert_array_equal(info["final_obs"][i], obs[i])  # the new episode's first
        for _ in range(20):  # training goes on
            envs.step(envs.action_space.sample())
    finally:
        envs.close()


def test_a_worker_given_up_for_lost_never_writes_into_its_replacements_rows():
    # A same-host worker frozen past dead_after is given up for lost and its envs rebuilt on the
    # spare; when it wakes up it finishes the step it was sent and writes its results into the
    # segment it mapped. Those rows must not be the replacement's: every observation returned
    # stays the one its env holds, and the other envs stay step for step equal to SyncVectorEnv.
    with start_farm(3, 2, dead_after=2.5) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, on_failure="restart", copy=False)
        sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
        rng = np.random.default_rng(0)

        def step_both() -> tuple:
            actions = rng.integers(0, 2, 4)
            ours, theirs = envs.step(actions), sync.step(actions)
            assert_same(
                tuple(part[:2] for part in theirs[:4]), tuple(part[:2] for part in ours[:4])
            )  # envs 0-1: as Sync
            return ours

        def assert_obs_are_the_envs_own(obs: np.ndarray) -> None:
            states = np.array(envs.get_attr("state"), np.float32)
            np.testing.assert_array_equal(obs, states)

        try:
            assert all(worker.shared_memory for worker in envs._workers)
            assert_same(
                tuple(part[:2] for part in sync.reset(seed=0)[:1]), tuple(part[:2] for part in envs.reset(seed=0)[:1])
            )
            for _ in range(5):
                step_both()
            victim = envs._workers[1]
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                obs, _, _, truncated, info = step_both()  # waits dead_after, then restarts envs 2-3 on the spare
                assert truncated[2:].all() and info["_envfarm_restarted"].tolist() == [False, False, True, True]
                assert envs._workers[1].pid != victim.pid
                kept = obs.copy()
            finally:
                os.kill(victim.pid, signal.SIGCONT)  # it wakes up and finishes the step it was sent
            time.sleep(1.5)
            np.testing.assert_array_equal(obs, kept)  # a view of the batch buffer (copy=False): untouched
            assert_obs_are_the_envs_own(obs)
            for _ in range(10):
                obs = step_both()[0]
                assert_obs_are_the_envs_own(obs)
        finally:
            envs.close()
            sync.close()


def test_restart_without_capacity_is_a_clear_error(quick_farm):
    broker, processes = quick_farm  # two 2-slot workers, both leased below
    envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, on_failure="restart", shared_memory=False)
    try:
        envs.reset(seed=0)
        processes[0].kill()
        time.sleep(0.5)  # its connection is gone: the next send finds out
        with pytest.raises(
            envfarm.WorkerDiedError,
            match=r"no capacity left to restart it: the farm has no free worker with 2 slots for 'CartPole-v1' \(free: \[\]\)",
        ):
            for _ in range(1000):
                envs.step(envs.action_space.sample())
    finally:
        envs.close()


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


def test_status_shows_workers_slots_and_leases(farm):
    envs = envfarm.make_vec("CartPole-v1", 4, broker=farm.endpoint)
    try:
        envs.reset(seed=0)
        result = subprocess.run(
            [sys.executable, "-m", "envfarm", "status", "--broker", farm.endpoint],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("3 workers, 12 slots, 4 leased to 1 trainers, 8 free, ")
        assert result.stdout.count("slots  free ") == 2
    finally:
        envs.close()
    silent = subprocess.run(
        [sys.executable, "-m", "envfarm", "status", "--broker", "tcp://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert silent.returncode == 1 and "no answer from the broker" in silent.stderr


def test_the_broker_says_where_it_sees_a_peer(farm):
    # STATUS `you`: where a trainer reaching the broker on loopback binds its data socket when the
    # broker sees it from elsewhere (a published container port: tests/docker checks that case).
    assert query(farm.endpoint)["you"] == "127.0.0.1"
    envs = envfarm.make_vec("CartPole-v1", 4, broker=farm.endpoint)
    try:  # seen on loopback: a head node, whose remote workers reach it at the broker's address
        assert envs._router.socket.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://0.0.0.0:")
    finally:
        envs.close()


def test_training_goes_on_through_a_broker_restart():
    with start_farm(2, 2, dead_after=2.5) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint)
        sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
        try:
            assert_same(sync.reset(seed=3), envs.reset(seed=3))
            broker.stop()  # the broker goes away and comes back on the same port, knowing nothing
            time.sleep(0.5)
            with running_broker(broker.endpoint, dead_after=2.5) as again:
                for actions in np.random.default_rng(2).integers(
                    0, 2, (100, 4)
                ):  # the data path does not pass the broker
                    assert_same(sync.step(actions), envs.step(actions))
                # The workers tell the new broker which lease they serve; the trainer's heartbeats keep it.
                assert wait_until(lambda: len(again.workers) == 2 and all(r.lessee for r in again.workers.values()), 15)
                time.sleep(3)  # longer than dead_after: the lease stands
                assert all(r.lessee for r in again.workers.values())
                envs.close()
                assert wait_until(lambda: all(r.lessee is None for r in again.workers.values()), 5)
                assert_serves(again.endpoint, 4)  # and serve the next trainer
        finally:
            envs.close()
            sync.close()


def test_an_oversized_frame_is_refused_and_the_broker_goes_on(farm):
    from envfarm.server.broker import MAX_MESSAGE_BYTES

    context = zmq.Context()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + b"huge")
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(farm.endpoint)
    try:
        peer.send_multipart([b"", bytes(MAX_MESSAGE_BYTES + 1)])  # libzmq drops this peer's connection
        time.sleep(1)
    finally:
        peer.close()
        context.term()
    assert_serves(farm.endpoint, 4)


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


def test_a_peer_that_connects_again_under_its_identity_is_heard_at_once(farm):
    # After a network blip a trainer's or worker's socket reconnects while the broker may still
    # hold its old connection; libzmq refused such a connection for good (it was never heard again).
    context = zmq.Context()
    try:
        identity, sockets = m.TRAINER_PREFIX + os.urandom(15), []
        for _ in range(2):  # the second while the first is still connected
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.IDENTITY, identity)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(farm.endpoint)
            sockets.append(socket)
            socket.send_multipart([b"", *pack(m.make(m.STATUS, 1))])
            assert socket.poll(5000), "the broker did not answer"
            assert unpack(socket.recv_multipart()[1:])["kind"] == m.RESULT
    finally:
        context.destroy(linger=0)


def test_a_worker_builds_no_more_envs_than_its_slots(quick_farm):
    # A peer that leased a 2-slot worker asks it, directly, for 5000 envs on one CREATE.
    broker, _ = quick_farm
    context = zmq.Context()
    try:
        data = context.socket(zmq.ROUTER)
        port = data.bind_to_random_port("tcp://127.0.0.1")
        control = context.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + os.urandom(15))
        control.connect(broker.endpoint)
        control.send_multipart(
            [
                b"",
                *pack(
                    m.make(
                        m.LEASE, 1, envs=2, env_id="CartPole-v1", endpoint=f"tcp://127.0.0.1:{port}", server_key=None
                    )
                ),
            ]
        )
        assert control.poll(5000) and unpack(control.recv_multipart()[1:])["kind"] == m.LEASED
        assert data.poll(5000)
        identity, *frames = data.recv_multipart()
        assert unpack(frames)["kind"] == m.HELLO
        create = m.make(
            m.CREATE, 2, envs=list(range(5000)), source={"env_id": "CartPole-v1"}, autoreset_mode="NextStep"
        )
        data.send_multipart([identity, *pack(create)])
        while True:  # heartbeats come from another identity; the reply from this one
            assert data.poll(5000), "no reply to the oversized CREATE"
            sender, *frames = data.recv_multipart()
            if sender == identity:
                break
        reply = unpack(frames)
        assert (
            reply["kind"] == m.ERROR
            and "CREATE asks for 5000 envs; this worker hosts at most 2 (--slots)" in reply["error"]["message"]
        )
        control.send_multipart([b"", *pack(m.make(m.RELEASE, 3))])
    finally:
        context.destroy(linger=0)


def test_worker_arguments_are_checked():
    for processes in ("0", "many"):
        result = subprocess.run(
            [sys.executable, "-m", "envfarm", "worker", "--broker", "tcp://127.0.0.1:9", "--processes", processes],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2 and "--processes must be a positive number or 'auto'" in result.stderr


def test_envfarm_run_on_a_farm(farm):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "envfarm",
            "run",
            "CartPole-v1",
            "--num-envs",
            "8",
            "--steps",
            "2000",
            "--broker",
            farm.endpoint,
            "--on-failure",
            "restart",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["num_workers"] == 2 and summary["steps"] >= 2000 and summary["episodes"] > 0
    )  # two 4-slot farm workers


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


def test_the_brokers_prometheus_metrics_count_workers_leases_steps_restarts_and_losses():
    import urllib.request

    from envfarm.server.metrics import serve_metrics

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("envfarm_")}

    with start_farm(3, 2, dead_after=2.5) as (broker, processes):
        server, port = serve_metrics(broker, "127.0.0.1:0")
        try:
            metrics = scrape()
            assert (
                metrics["envfarm_workers"],
                metrics["envfarm_slots"],
                metrics["envfarm_slots_free"],
                metrics["envfarm_trainers"],
            ) == (3, 6, 6, 0)
            envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, on_failure="restart")
            try:
                envs.reset(seed=0)
                for _ in range(300):
                    envs.step(envs.action_space.sample())
                leased = {record.pid for record in broker.workers.values() if record.lessee is not None}
                assert wait_until(lambda: scrape()["envfarm_env_steps_total"] >= 600, 10), scrape()
                metrics = scrape()
                assert (
                    metrics["envfarm_workers_leased"],
                    metrics["envfarm_slots_free"],
                    metrics["envfarm_trainers"],
                    metrics["envfarm_leases_total"],
                ) == (1, 4, 1, 1)
                os.kill(leased.pop(), signal.SIGKILL)
                deadline = time.monotonic() + 30
                while (
                    "envfarm_restarted" not in envs.step(envs.action_space.sample())[4] and time.monotonic() < deadline
                ):
                    pass
                assert wait_until(lambda: scrape()["envfarm_workers_lost_total"] == 1, 10), scrape()
                assert scrape()["envfarm_restarts_total"] == 1
            finally:
                envs.close()
            assert wait_until(lambda: scrape()["envfarm_trainers"] == 0, 10)
        finally:
            server.shutdown()
