"""A broker facing hostile peers: one peer's message, however crafted, is that peer's problem only.

The tests send the broker what a hostile or careless peer could, crafted on DEALER sockets, then
check what a user sees: the broker still serves a real trainer (a worker process registered with
it is leased, reset, stepped and closed), and a peer gets no further than its key's role allows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterator

import pytest
import zmq
import zmq.auth
from farms import assert_serves, running_broker, start_farm, workers_of
from polling import wait_until

import envfarm
from envfarm.protocol import PROTOCOL_VERSION, pack, unpack
from envfarm.protocol import messages as m
from envfarm.transport.curve import keygen


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def registration(**fields: Any) -> dict[str, Any]:
    """A farm worker's HELLO to the broker."""
    hello = m.make(
        m.HELLO,
        0,
        version=PROTOCOL_VERSION,
        pid=os.getpid(),
        host="fake",
        slots=2,
        allow=None,
        lease=None,
        lessee=None,
        steps=0,
    )
    return {**hello, **fields}


@contextlib.contextmanager
def peers() -> Iterator[Any]:
    """A function that opens DEALERs to a broker: (endpoint, identity, keys=None, server_key=None)."""
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def connect(
        endpoint: str, identity: bytes, keys: tuple[bytes, bytes] | None = None, server_key: bytes | None = None
    ) -> zmq.Socket:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, identity)
        socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            socket.curve_publickey, socket.curve_secretkey = keys
            socket.curve_serverkey = server_key
        socket.connect(endpoint)
        sockets.append(socket)
        return socket

    try:
        yield connect
    finally:
        for socket in sockets:
            socket.close(linger=0)
        context.term()


def ask(trainer: zmq.Socket, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """A trainer's control message to the broker, and its reply (None: no reply within `timeout`)."""
    trainer.send_multipart([b"", *pack(message)])
    if not trainer.poll(int(timeout * 1000)):
        return None
    delimiter, *frames = trainer.recv_multipart()
    assert delimiter == b""
    return unpack(frames)


def test_messages_nested_1000_deep_do_not_hurt_the_broker():
    # ~1 KB each: repr() or str() of such a value raises RecursionError, which killed the broker.
    with start_farm(1, 2) as (broker, _), peers() as connect:
        worker = connect(broker.endpoint, m.WORKER_PREFIX + b"-hostile")
        for hello in (
            {**registration(), "kind": nested(1000)},
            registration(allow=nested(1000)),
            registration(allow=["CartPole-*", nested(1000)]),
            registration(host=nested(1000), lease=nested(1000), lessee=nested(1000)),
        ):
            worker.send_multipart(pack(hello))
        trainer = connect(broker.endpoint, m.TRAINER_PREFIX + b"-hostile")
        for message in (
            {"kind": nested(1000), "rid": 1},
            m.make(m.LEASE, 2, envs=2, env_id=nested(1000), endpoint="tcp://127.0.0.1:9", server_key=None),
        ):
            reply = ask(trainer, message)
            assert reply is not None and reply["kind"] == m.ERROR and "ProtocolError" in reply["error"]["type"]
        assert m.WORKER_PREFIX + b"-hostile" not in broker.workers  # each HELLO was dropped
        assert_serves(broker.endpoint, 2)


def test_a_failure_while_handling_one_message_is_that_peers_problem_only(monkeypatch):
    # Whatever escapes the handling of one message (here a failure made on purpose, for two
    # peers only) must not stop the broker serving the others.
    with start_farm(1, 2) as (broker, _), peers() as connect:
        handle = broker._handle

        def failing_for_two(sender: bytes, frames: list) -> None:
            if sender in (m.WORKER_PREFIX + b"-unlucky", m.TRAINER_PREFIX + b"-unlucky"):
                raise RuntimeError("a bug reached by this peer's message")
            handle(sender, frames)

        monkeypatch.setattr(broker, "_handle", failing_for_two)
        connect(broker.endpoint, m.WORKER_PREFIX + b"-unlucky").send_multipart(pack(registration()))
        assert ask(connect(broker.endpoint, m.TRAINER_PREFIX + b"-unlucky"), m.make(m.STATUS, 1), timeout=1) is None
        assert_serves(broker.endpoint, 2)


def test_a_huge_allow_list_is_refused_and_leases_stay_quick():
    # A HELLO just under the broker's 1 MiB frame limit carried ~110k patterns; each lease ran
    # fnmatch over all of them (~11 s per fake worker), and each registration kept ~8 MB.
    from envfarm.server.broker import MAX_MESSAGE_BYTES

    patterns = [f"N{i:06d}*" for i in range(110_000)]
    assert MAX_MESSAGE_BYTES - 100_000 < len(pack(registration(allow=patterns))[0]) < MAX_MESSAGE_BYTES
    with start_farm(1, 2) as (broker, _), peers() as connect:
        fakes = [m.WORKER_PREFIX + b"-huge-%d" % i for i in range(10)]
        for identity in fakes:
            connect(broker.endpoint, identity).send_multipart(pack(registration(allow=patterns)))

        # The largest allow-list that passes: matched in one compiled expression per worker.
        def widest(n: int) -> list[str]:
            return [
                f"W{n:03d}-{i:02d}-".ljust(m.MAX_ALLOW_CHARS // m.MAX_ALLOW - 1, "x") + "*" for i in range(m.MAX_ALLOW)
            ]

        assert sum(map(len, widest(0))) == m.MAX_ALLOW_CHARS
        bounded = [m.WORKER_PREFIX + b"-wide-%d" % i for i in range(100)]
        for n, identity in enumerate(bounded):
            connect(broker.endpoint, identity).send_multipart(pack(registration(allow=widest(n))))
        assert wait_until(lambda: all(identity in broker.workers for identity in bounded), 30)
        assert not any(identity in broker.workers for identity in fakes)
        start = time.monotonic()
        assert_serves(broker.endpoint, 2)
        assert time.monotonic() - start < 15  # was minutes: the real lease timed out


def test_an_empty_allow_list_allows_no_env():
    with running_broker() as broker, peers() as connect:
        connect(broker.endpoint, m.WORKER_PREFIX + b"-none").send_multipart(pack(registration(allow=[])))
        assert wait_until(lambda: m.WORKER_PREFIX + b"-none" in broker.workers, 5)
        lease = m.make(m.LEASE, 1, envs=1, env_id="CartPole-v1", endpoint="tcp://127.0.0.1:9", server_key=None)
        reply = ask(connect(broker.endpoint, m.TRAINER_PREFIX + b"-t"), lease)
        assert reply["kind"] == m.ERROR and "the farm has 0 free slots for 'CartPole-v1'" in reply["error"]["message"]


def test_a_flood_of_identities_cannot_grow_the_registry_without_end():
    with running_broker(dead_after=2.5, max_workers=20) as broker, peers() as connect:
        for i in range(200):
            connect(broker.endpoint, m.WORKER_PREFIX + b"-flood-%d" % i).send_multipart(
                pack(registration(allow=["Nothing-*"]))
            )
        assert wait_until(lambda: len(broker.workers) == 20, 10)
        time.sleep(0.5)
        assert len(broker.workers) == 20
        # The flood goes silent and is struck off: a real worker registers and serves.
        command = [sys.executable, "-m", "envfarm", "worker", "--broker", broker.endpoint, "--slots", "2"]
        with workers_of(broker, [command]):
            assert wait_until(lambda: len(broker.workers) == 1, 30)
            assert_serves(broker.endpoint, 2)


@pytest.fixture
def keys(tmp_path):
    """Key pairs of a broker, a worker, a trainer, a second trainer and an admin, and a clients
    directory that lists the last four by role. Yields a function: name -> (public, secret)."""
    clients = tmp_path / "clients"
    for name, role in (
        ("broker", None),
        ("worker", "workers"),
        ("trainer", "trainers"),
        ("other-trainer", "trainers"),
        ("admin", "admins"),
    ):
        public, _ = keygen(str(tmp_path), name)
        if role is not None:
            (clients / role).mkdir(parents=True, exist_ok=True)
            (clients / role / f"{name}.key").write_bytes(open(public, "rb").read())

    def pair(name: str) -> tuple[bytes, bytes]:
        return zmq.auth.load_certificate(str(tmp_path / f"{name}.key_secret"))

    pair.file = lambda name: str(tmp_path / name)  # type: ignore[attr-defined]
    pair.curve = (str(tmp_path / "broker.key_secret"), str(clients))  # type: ignore[attr-defined]
    pair.broker_key = pair("broker")[0]  # type: ignore[attr-defined]
    return pair


def test_each_key_may_do_only_what_its_role_allows(keys):
    with running_broker(curve=keys.curve) as broker, peers() as connect:

        def as_trainer(name: str, message: dict[str, Any]) -> dict[str, Any] | None:
            return ask(connect(broker.endpoint, m.TRAINER_PREFIX + os.urandom(8), keys(name), keys.broker_key), message)

        lease = m.make(m.LEASE, 2, envs=1, env_id="CartPole-v1", endpoint="tcp://127.0.0.1:9", server_key=None)
        for name, message in (
            ("worker", m.make(m.STATUS, 1)),
            ("worker", lease),
            ("admin", lease),
            ("admin", m.make(m.RELEASE, 3)),
        ):
            reply = as_trainer(name, message)
            assert reply["kind"] == m.ERROR and reply["error"]["type"] == "PermissionError", (name, message["kind"])
            assert f"may not send {message['kind']}" in reply["error"]["message"]
        for name in ("admin", "trainer"):
            assert as_trainer(name, m.make(m.STATUS, 1))["kind"] == m.RESULT
        # Only a worker's key registers a worker.
        for name in ("trainer", "admin", "worker"):
            connect(broker.endpoint, m.WORKER_PREFIX + name.encode(), keys(name), keys.broker_key).send_multipart(
                pack(registration())
            )
        assert wait_until(lambda: m.WORKER_PREFIX + b"worker" in broker.workers, 5)
        time.sleep(0.5)
        assert list(broker.workers) == [m.WORKER_PREFIX + b"worker"]


def test_a_clients_directory_with_roles_and_loose_keys_is_refused(keys, tmp_path):
    from envfarm.server.broker import Broker

    (tmp_path / "clients" / "loose.key").write_bytes((tmp_path / "worker.key").read_bytes())
    with pytest.raises(ValueError, match="role subdirectories .* and keys of its own"):
        Broker("tcp://127.0.0.1:0", curve=keys.curve)


def test_a_trainer_identity_stays_bound_to_its_key_across_a_broker_restart(keys):
    # Every worker leased to a trainer learns its identity (JOIN), so any listed key could claim it
    # first at a restarted broker, and release the trainer's lease. The workers also learn the
    # trainer's key, report it with their lease, and the restarted broker binds the identity to it.
    victim = m.TRAINER_PREFIX + os.urandom(15)
    with peers() as connect:
        with running_broker(curve=keys.curve) as first:
            worker = connect(first.endpoint, m.WORKER_PREFIX + b"-crafted", keys("worker"), keys.broker_key)
            worker.send_multipart(pack(registration()))
            assert wait_until(lambda: m.WORKER_PREFIX + b"-crafted" in first.workers, 5)
            trainer = connect(first.endpoint, victim, keys("trainer"), keys.broker_key)
            leased = ask(
                trainer,
                m.make(
                    m.LEASE,
                    1,
                    envs=2,
                    env_id="CartPole-v1",
                    endpoint="tcp://127.0.0.1:9",
                    server_key=keys("trainer")[0].decode(),
                ),
            )
            assert leased["kind"] == m.LEASED, leased
            assert worker.poll(5000)
            join = m.check(unpack(worker.recv_multipart()))
            assert (
                join["kind"] == m.JOIN
                and join["trainer"] == victim
                and join["trainer_key"] == keys("trainer")[0].decode()
            )
            trainer.close(linger=0)  # it comes back below, after the impostor
            endpoint = first.endpoint
        time.sleep(0.5)
        with running_broker(endpoint, dead_after=30, curve=keys.curve) as again:
            served = registration(lease=join["lease"], lessee=victim, trainer_key=join["trainer_key"])
            worker.send_multipart(pack(served))  # the same connection, reconnected: as a worker heartbeats
            assert wait_until(lambda: m.WORKER_PREFIX + b"-crafted" in again.workers, 10)
            assert again.workers[m.WORKER_PREFIX + b"-crafted"].lessee == victim
            # A worker that reports the same lease with another trainer key is not believed.
            liar = connect(endpoint, m.WORKER_PREFIX + b"-liar", keys("worker"), keys.broker_key)
            liar.send_multipart(pack({**served, "trainer_key": keys("other-trainer")[0].decode()}))
            assert liar.poll(5000) and unpack(liar.recv_multipart())["kind"] == m.CLOSE
            # Another trainer's key under the victim's identity: its RELEASE and LEASE go unanswered.
            impostor = connect(endpoint, victim, keys("other-trainer"), keys.broker_key)
            for message in (
                m.make(m.RELEASE, 2),
                m.make(m.LEASE, 3, envs=2, env_id="CartPole-v1", endpoint="tcp://127.0.0.1:9", server_key=None),
            ):
                assert ask(impostor, message, timeout=1) is None
            worker.send_multipart(pack(served))
            assert not worker.poll(500)  # no CLOSE: the lease stands
            assert again.workers[m.WORKER_PREFIX + b"-crafted"].lessee == victim
            assert again.trainer_keys[victim] == keys("trainer")[0].decode()  # bound to the key its workers reported
            # The trainer itself connects again while the impostor still holds its identity: it
            # takes the identity over, is heard, and releases its lease.
            trainer = connect(endpoint, victim, keys("trainer"), keys.broker_key)
            reply = ask(trainer, m.make(m.RELEASE, 4), timeout=5)
            assert reply is not None and reply["kind"] == m.RESULT
            assert worker.poll(5000) and unpack(worker.recv_multipart())["kind"] == m.CLOSE
            assert ask(impostor, m.make(m.RELEASE, 5), timeout=1) is None  # the impostor, unheard all along


def test_without_a_reported_trainer_key_a_curve_broker_ends_the_lease(keys):
    # A worker that does not say which key its trainer leased with: the identity cannot be bound,
    # so the lease is not adopted (anyone could then speak for the trainer); the worker is told to close.
    with running_broker(curve=keys.curve) as broker, peers() as connect:
        worker = connect(broker.endpoint, m.WORKER_PREFIX + b"-old", keys("worker"), keys.broker_key)
        worker.send_multipart(pack(registration(lease="0123456789abcdef", lessee=m.TRAINER_PREFIX + os.urandom(15))))
        assert worker.poll(5000) and unpack(worker.recv_multipart())["kind"] == m.CLOSE
        assert broker.workers[m.WORKER_PREFIX + b"-old"].lessee is None


def test_curve_training_goes_on_through_a_broker_restart(keys):
    # Real workers and a real trainer, keys by role: the workers report their trainer's key with
    # their lease, and the restarted broker adopts the lease bound to it (a lease it could not bind
    # would be closed, and the trainer would lose its workers).
    worker_curve = ("--curve-secret", keys.file("worker.key_secret"), "--broker-key", keys.file("broker.key"))
    trainer_curve = (keys.file("trainer.key_secret"), keys.file("broker.key"))
    with start_farm(2, 2, *worker_curve, dead_after=2.5, curve=keys.curve) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, curve=trainer_curve)
        try:
            envs.reset(seed=0)
            broker.stop()
            time.sleep(0.5)
            with running_broker(broker.endpoint, dead_after=2.5, curve=keys.curve) as again:
                for _ in range(50):
                    envs.step(envs.action_space.sample())
                identity = envs._pool.broker.socket.getsockopt(zmq.IDENTITY)
                assert wait_until(
                    lambda: len(again.workers) == 2 and all(r.lessee == identity for r in again.workers.values()), 15
                )
                assert again.trainer_keys[identity] == keys("trainer")[0].decode()
                time.sleep(3)  # longer than dead_after: the trainer's heartbeats, under its key, keep the lease
                assert all(r.lessee == identity for r in again.workers.values())
                envs.step(envs.action_space.sample())
                envs.close()
                assert wait_until(lambda: all(r.lessee is None for r in again.workers.values()), 5)
                assert_serves(again.endpoint, 4, curve=trainer_curve)
        finally:
            envs.close()
