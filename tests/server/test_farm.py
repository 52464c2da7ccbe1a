"""A farm on loopback: a broker, worker processes that register with it, and trainers that lease them. Leasing, Curve, status and the broker.

Liveness verdicts are in test_farm_liveness.py, the restart policy in test_farm_restart.py;
the fixtures `farm` and `quick_farm` in conftest.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import zmq
import zmq.auth
from compare import assert_same
from farms import assert_serves, running_broker, start_farm, worker_command, workers_of
from polling import wait_until

import envfarm
from envfarm.client.broker_link import query
from envfarm.protocol import messages as m
from envfarm.protocol.packing import pack, unpack


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
