"""Curve admission by a predicate (a trainer's data socket): a key is answered on its own, so
strangers waiting to be refused never hold up a key that is, or comes to be, admitted."""

import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from envfarm.transport.curve import ZapHandler, secure_client, secure_server

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without Curve")


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - start


class Server:
    def __init__(self, wait: float, max_parked: int = 256):
        self.context = zmq.Context()
        self.admitted: set[bytes] = set()
        self.keys = zmq.curve_keypair()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.handler = secure_server(self.context, self.socket, self.keys, lambda key: key in self.admitted, wait=wait)
        assert isinstance(self.handler, ZapHandler)
        self.handler.max_parked = max_parked  # before any client connects
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.refused = 0

    def client(self, keys: tuple[bytes, bytes]) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 60_000)  # one try each: a refused stranger does not come back
        secure_client(socket, keys, self.keys[0])
        socket.connect(self.endpoint)
        return socket

    def count_refused(self) -> int:
        while self.monitor.poll(0):
            if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused += 1
        return self.refused

    def receives(self, payload: bytes, timeout: float) -> None:
        assert self.socket.poll(timeout * 1000), f"{payload!r} did not arrive within {timeout} s"
        assert self.socket.recv_multipart()[1] == payload

    def close(self) -> None:
        self.handler.stop()
        self.context.destroy(linger=0)


def test_a_known_key_is_admitted_at_once_while_strangers_wait_to_be_refused():
    server = Server(wait=3.0)
    try:
        strangers = [server.client(zmq.curve_keypair()) for _ in range(40)]
        for stranger in strangers:  # kept open by the list
            stranger.send(b"stranger")
        wait_until(lambda: len(server.handler.parked) == 40, 10, "40 strangers parked")

        late, known = zmq.curve_keypair(), zmq.curve_keypair()
        server.admitted.add(known[0])
        start = time.monotonic()
        known_client = server.client(known)  # kept: a socket collected is closed, its message dropped
        known_client.send(b"known")
        server.receives(b"known", 1.5)
        known_took = time.monotonic() - start

        late_client = server.client(late)  # connects before its key is admitted: a worker ahead of its lease
        late_client.send(b"late")
        wait_until(lambda: len(server.handler.parked) == 41, 10, "the late key parked")
        start = time.monotonic()
        server.admitted.add(late[0])
        server.handler.wake()
        server.receives(b"late", 1.5)
        late_took = time.monotonic() - start
        assert len(server.handler.parked) == 40  # the strangers wait still: they were not in the way
        print(
            f"\nwith 40 strangers parked: a known key admitted in {known_took * 1000:.0f} ms, a late one {late_took * 1000:.0f} ms after admit"
        )

        refused_after = wait_until(lambda: server.count_refused() == 40, 10, "40 strangers refused")
        assert not server.handler.parked
        assert not server.socket.poll(100), "a stranger got through"
        print(f"the 40 strangers refused {refused_after:.1f} s after that (their deadline: 3 s after they were parked)")
    finally:
        server.close()


def test_the_strangers_kept_waiting_are_bounded_and_the_others_refused_at_once():
    server = Server(wait=30.0, max_parked=8)
    try:
        strangers = [server.client(zmq.curve_keypair()) for _ in range(20)]  # noqa: F841 (kept: a socket collected is closed)
        wait_until(lambda: server.count_refused() == 12, 5, "the 12 strangers beyond the bound refused")
        assert len(server.handler.parked) == 8
        known = zmq.curve_keypair()
        server.admitted.add(known[0])
        known_client = server.client(known)
        known_client.send(b"known")
        server.receives(b"known", 1.5)
    finally:
        server.close()
