"""The trainer's client of its broker, against brokers played by a socket: a broker that refused
the handshake, a lease that does not add up, and a reply too large to take."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import zmq

from envfarm.client import broker_link
from envfarm.client.broker_link import BrokerClient
from envfarm.client.errors import FarmError
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo
from envfarm.protocol.packing import pack, unpack

WORKER = m.WORKER_PREFIX + b"\x01" * 15


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def answering_broker(context: zmq.Context, answer: dict | bytes, kind: str = m.LEASED) -> tuple[str, threading.Thread]:
    """A ROUTER that answers the first request it gets with `answer` (its fields, under the
    request's rid and `kind`; or raw bytes), from a thread of its own."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        try:
            if socket.poll(10_000):
                peer, _, *frames = socket.recv_multipart()
                reply = answer if isinstance(answer, bytes) else pack(m.make(kind, unpack(frames)["rid"], **answer))
                socket.send_multipart([peer, b"", *([reply] if isinstance(reply, bytes) else reply)])
                time.sleep(0.5)  # lets the reply leave before the socket closes
        finally:
            socket.close(linger=0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


LEASE = {"envs": 4, "env_id": "CartPole-v1", "endpoint": "tcp://127.0.0.1:9", "server_key": None, "add": False}


@pytest.mark.parametrize(
    "workers, dead_after, why",
    [
        ([[WORKER, 4, "host", 1]], 5.0, "not \\[identity, slots, host, pid, key\\]"),
        ([[WORKER, 0, "host", 1, None], [WORKER, 4, "host", 2, None]], 5.0, "a worker entry"),
        ([[b"T" + WORKER[1:], 4, "host", 1, None]], 5.0, "a worker entry"),
        ([[WORKER, "4", "host", 1, None]], 5.0, "a worker entry"),
        ([[WORKER, 2, "host", 1, None]], 5.0, "2 slots for 4 envs"),
        ([[WORKER, 4, "host", 1, None], [WORKER, 4, "host", 2, None]], 5.0, "more workers than 4 envs need"),
        ([[WORKER, 4, "host", 1, None]], 0, "dead_after 0"),
    ],
    ids=[
        "short-entry",
        "no-slots",
        "not-a-worker",
        "slots-a-string",
        "too-few-slots",
        "a-worker-too-many",
        "dead_after",
    ],
)
def test_a_lease_that_does_not_add_up_is_refused_naming_the_broker(context, workers, dead_after, why):
    endpoint, thread = answering_broker(context, {"workers": workers, "dead_after": dead_after})
    broker = BrokerClient(endpoint, None)
    try:
        with pytest.raises(FarmError, match=f"the broker at {endpoint} sent a lease that does not add up: .*{why}"):
            broker.lease(LEASE, 10)
    finally:
        broker.close()
        thread.join()


def test_a_reply_of_another_kind_is_no_lease(context):
    endpoint, thread = answering_broker(context, {}, kind=m.RELEASE)
    broker = BrokerClient(endpoint, None)
    try:
        with pytest.raises(FarmError, match="does not add up: a 'release' message, not 'leased'"):
            broker.lease(LEASE, 10)
    finally:
        broker.close()
        thread.join()


def test_a_release_the_broker_refuses_is_a_farm_error(context):
    # close() turns a FarmError into a warning and frees everything; another class would escape it.
    error = ErrorInfo.from_exception(PermissionError("this key may not send release")).to_data()
    endpoint, thread = answering_broker(context, {"error": error}, kind=m.ERROR)
    broker = BrokerClient(endpoint, None)
    try:
        with pytest.raises(FarmError, match="did not release this trainer's leases: this key may not send release"):
            broker.release(10)
        assert not broker.released
    finally:
        broker.close()
        thread.join()


def test_a_lease_that_adds_up_is_taken(context):
    workers = [[WORKER, 3, "a", 1, None], [WORKER[:-1] + b"\x02", 3, "b", None, "key"]]
    endpoint, thread = answering_broker(context, {"workers": workers, "dead_after": 2.5})
    broker = BrokerClient(endpoint, None)
    try:
        leased, dead_after = broker.lease(LEASE, 10)
        assert dead_after == 2.5 and [tuple(worker) for worker in leased] == [tuple(w) for w in workers]
    finally:
        broker.close()
        thread.join()


def test_a_reply_too_large_is_not_taken(context, monkeypatch):
    # Past the bound, libzmq drops the connection instead of taking the frame into memory; the
    # request then times out, as for a broker that does not answer.
    monkeypatch.setattr(broker_link, "MAX_BROKER_REPLY_BYTES", 1 << 20)
    endpoint, thread = answering_broker(context, b"\x00" * (2 << 20))
    broker = BrokerClient(endpoint, None)
    try:
        with pytest.raises(multiprocessing.TimeoutError, match="no reply from the broker within 2 s"):
            broker.lease(LEASE, 2)
    finally:
        broker.close()
        thread.join()


def test_a_request_to_a_broker_that_refused_the_handshake_never_blocks(context):
    # A plaintext trainer and a Curve broker: the handshake fails, libzmq drops the connection, and
    # a DEALER with none blocks in send. The request must be given up (its wait then times out,
    # saying why), not hang the trainer: seen once in CI, in make_vec's lease.
    server = context.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = zmq.curve_keypair()
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    broker = BrokerClient(f"tcp://127.0.0.1:{port}", None)
    try:
        start = time.monotonic()
        for _ in range(5):  # without a bound, the send in one of these blocks for good
            with pytest.raises(multiprocessing.TimeoutError, match="no reply from the broker within 0.1 s"):
                broker.ask(m.STATUS, {}, 0.1)
        assert time.monotonic() - start < 20  # each gives up within a second
    finally:
        broker.close()
