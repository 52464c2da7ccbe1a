"""The farm trainer's router judging its workers from their heartbeats, with peers played by sockets."""

from __future__ import annotations

import time

import pytest
import zmq
from polling import wait_until

from envfarm.client.errors import WorkerDiedError
from envfarm.client.router import Router
from envfarm.client.worker_handle import WorkerHandle
from envfarm.protocol import messages as m
from envfarm.protocol.packing import unpack

LINK = 7  # the token of the data connections the workers below said HELLO on


@pytest.fixture
def router():
    router = Router("tcp://127.0.0.1:*", trusted=False, farm=True)
    router.liveness.dead_after = 5.0
    yield router
    router.close()


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def heartbeat_sockets(router: Router, context: zmq.Context, count: int) -> tuple[list[WorkerHandle], list[zmq.Socket]]:
    workers, sockets = [], []
    for k in range(count):
        identity = m.WORKER_PREFIX + bytes([k + 1]) * 15
        worker = WorkerHandle(
            k, identity, range(k, k + 1), last_heard=time.monotonic(), connected=True, connection=LINK
        )
        router.add(worker)
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, identity + m.HEARTBEAT_SUFFIX)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(router.endpoint)
        workers.append(worker)
        sockets.append(socket)
    return workers, sockets


def test_many_heartbeats_proving_lost_requests_give_one_verdict_not_a_recursion(router, context):
    # Eight workers each queue 60 heartbeats saying they read a probe but not the request before it.
    workers, sockets = heartbeat_sockets(router, context, 8)
    for _ in range(60):
        for socket in sockets:
            socket.send(m.worker_heartbeat(LINK, 0, 1))
    assert wait_until(lambda: router.socket.poll(0), 5)
    time.sleep(0.5)
    with pytest.raises(WorkerDiedError, match=r"lost a request"):
        router.collect({worker: 1 for worker in workers}, 5.0, wait_all=True)


def test_heartbeats_of_another_connection_are_life_but_no_evidence(router, context):
    # A worker leased to this trainer again heartbeats on its new connection before the trainer
    # has taken its HELLO there: its counts belong to that connection, not to the one known.
    [worker], [socket] = heartbeat_sockets(router, context, 1)
    for _ in range(5):
        socket.send(m.worker_heartbeat(LINK + 1, 0, 1))
    with pytest.raises(Exception) as outcome:  # only the timeout can end this wait
        router.collect({worker: 1}, 1.5, wait_all=True)
    assert not isinstance(outcome.value, WorkerDiedError) and "no reply within 1.5 s" in str(outcome.value)
    assert not worker.dead


def test_a_worker_given_up_for_lost_is_told_to_leave_only_on_its_old_connection(router, context):
    [worker], [socket] = heartbeat_sockets(router, context, 1)
    data = context.socket(zmq.DEALER)  # the worker's data connection, where CLOSE would come
    data.setsockopt(zmq.IDENTITY, worker.identity)
    data.setsockopt(zmq.LINGER, 0)
    data.connect(router.endpoint)
    data.send(b"\x80")  # makes the connection known to the router (an empty map, dropped)
    worker.dead = "was silent for more than 5 s"
    time.sleep(0.3)
    socket.send(m.worker_heartbeat(LINK + 1, 0, 0))  # from its next lease's connection: left alone
    time.sleep(0.3)
    router._drain({}, {})
    assert not data.poll(500)
    socket.send(m.worker_heartbeat(LINK, 0, 0))  # from the connection it was given up on: told to leave
    time.sleep(0.3)
    router._drain({}, {})
    assert data.poll(2000)
    assert unpack(data.recv_multipart())["kind"] == m.CLOSE


def test_a_worker_is_gone_only_when_both_its_connections_are(router, context):
    # A data connection being remade after a network reset is not a death while the worker's
    # heartbeat connection stands; a killed process loses both.
    [worker], [socket] = heartbeat_sockets(router, context, 1)
    socket.send(m.worker_heartbeat(LINK, 0, 0))
    time.sleep(0.3)
    with pytest.raises(Exception) as outcome:  # no data connection at all, yet the heartbeats come
        router.collect({worker: 1}, 1.5, wait_all=True)
    assert not isinstance(outcome.value, WorkerDiedError) and not worker.dead
    socket.close(linger=0)  # now nothing of it is left
    with pytest.raises(WorkerDiedError, match="lost its connection"):
        router.collect({worker: 1}, 5.0, wait_all=True)


def test_a_worker_that_could_not_read_its_request_fails_that_request_instead_of_leaving_it_waiting(router, context):
    # A worker answers a request it cannot decode with an ERROR of rid 0 (it cannot know the rid):
    # that is the answer to what was asked of it, not a stale reply to drop while waiting forever.
    from envfarm.protocol.errors import ErrorInfo, ProtocolError
    from envfarm.protocol.packing import pack

    identity = m.WORKER_PREFIX + b"\x09" * 15
    worker = WorkerHandle(0, identity, range(0, 1), last_heard=time.monotonic(), connected=True, connection=LINK)
    router.add(worker)
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(router.endpoint)
    error = ErrorInfo.from_exception(ProtocolError("malformed message: not a map")).to_data()
    socket.send_multipart(pack(m.make(m.ERROR, 0, error=error)))
    replies = router.collect({worker: 42}, 5.0, wait_all=True)
    assert replies[worker]["kind"] == m.ERROR and replies[worker]["rid"] == 42
