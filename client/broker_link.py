"""The trainer's link to a farm broker: where its data socket binds, the client it asks the broker
through (lease, release), and the heartbeat thread that keeps its leases."""

from __future__ import annotations

import ipaddress
import multiprocessing
import secrets
import socket as sockets
import threading
import time
from typing import Any, NamedTuple

import zmq

from envfarm.client.errors import FarmError, rebuild
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.transport.curve import KeyPair, load_key_pair, load_public_key, secure_client

# The largest frame taken from a broker, far above its largest reply (a STATUS listing its
# MAX_WORKERS workers): a larger one drops the connection (libzmq) instead of filling memory.
MAX_BROKER_REPLY_BYTES = 64 << 20
_LAST_LOOK = 64  # messages read after a request's deadline, at most, looking for its reply


def query(broker: str, curve: tuple[str, str] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The broker's STATUS reply; TimeoutError if it does not answer in `timeout` seconds."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + secrets.token_bytes(15))
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_BROKER_REPLY_BYTES)
    if curve is not None:
        secure_client(socket, load_key_pair(curve[0]), load_public_key(curve[1]))
    socket.connect(broker)
    try:
        socket.send_multipart([b"", *pack(m.make(m.STATUS, 1))])
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from the broker at {broker} within {timeout:g} s")
        _, *frames = socket.recv_multipart()
        return unpack(frames)
    finally:
        socket.close(linger=0)
        context.term()


def farm_endpoint(
    broker: str, listen: str | None, curve: tuple[str, str] | None = None, timeout: float = 5.0
) -> tuple[str, str]:
    """Where a trainer's data socket binds, and the host farm workers are told to connect to.

    `listen` is "host" or "host:port"; by default, this host's address on its route to the broker
    (which the workers reach too), and a free port. A trainer that reaches its broker on loopback:
    - where the broker sees it from another address (its STATUS says: the broker's port is
      published from a container, and that address is the bridge's), it binds there only, and
      the broker sends its workers there;
    - where the broker sees it on loopback too (a head node: broker and trainer on one host,
      workers elsewhere, which reach the trainer at the address they reach the broker at, unknown
      here), it binds every interface, as it does for a broker that does not say (an older one)
      or does not answer within `timeout`.
    """
    host, port = listen or "", ""
    if host.count(":") == 1:
        host, port = host.split(":")
    if not host and not broker.startswith("tcp://"):
        host = "127.0.0.1"  # an ipc broker: the farm is on this host
    elif not host:
        with sockets.socket(sockets.AF_INET, sockets.SOCK_DGRAM) as probe:  # sends nothing: only picks the route
            probe.connect((broker[len("tcp://") :].rsplit(":", 1)[0], 9))
            host = probe.getsockname()[0]
    address = sockets.gethostbyname(host)
    bind = address
    if listen is None and ipaddress.ip_address(address).is_loopback and broker.startswith("tcp://"):
        seen = _seen_at(broker, curve, timeout)
        bind = seen if seen is not None and not seen.is_loopback else "0.0.0.0"
    return f"tcp://{bind}:{port or '*'}", host


def _seen_at(
    broker: str, curve: tuple[str, str] | None, timeout: float
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the broker sees this host at; None if it does not say or does not answer (the
    lease that follows says why)."""
    try:
        return ipaddress.ip_address(query(broker, curve, timeout).get("you"))
    except (TimeoutError, ValueError):
        return None


class LeasedWorker(NamedTuple):
    """A worker as a broker's lease describes it."""

    identity: bytes
    slots: int
    host: str
    pid: int | None
    key: str | None  # its Curve public key (z85), with Curve on


class BrokerClient:
    """A farm trainer's client of its broker: it asks for leases and gives them back, on a DEALER
    of its own, while a heartbeat thread tells the broker this trainer is alive."""

    def __init__(self, endpoint: str, curve: tuple[KeyPair, bytes] | None):
        """`curve`: (this trainer's keys, the broker's public key), or None for plaintext."""
        self.endpoint = endpoint
        self.context = zmq.Context()
        try:
            self.socket = self.context.socket(zmq.DEALER)
            self.socket.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + secrets.token_bytes(15))
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_BROKER_REPLY_BYTES)
            # A send waits at most this long for a connection to the broker (a DEALER with none
            # blocks: e.g. after a Curve handshake the broker refused). The request is then lost,
            # and the wait for its reply times out naming the likely cause: never a hang.
            self.socket.setsockopt(zmq.SNDTIMEO, 1000)
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # a dead broker or half-open TCP is noticed
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            if curve is not None:
                secure_client(self.socket, *curve)
            self.socket.connect(endpoint)
        except BaseException:  # an address that does not parse: free what was made
            self.context.destroy(linger=0)
            raise
        self._heartbeat = BrokerHeartbeat(endpoint, self.socket.getsockopt(zmq.IDENTITY) + m.HEARTBEAT_SUFFIX, curve)
        self._next_rid = 0
        self.released = False

    def ask(self, kind: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Sends the broker a request and returns its reply.

        Raises:
            multiprocessing.TimeoutError: No reply within `timeout` seconds.
            FarmError: A malformed reply.
            The error the broker's reply carries (e.g. RuntimeError: not enough free workers).
        """
        self._next_rid += 1
        rid = self._next_rid
        try:
            self.socket.send_multipart([b"", *pack(m.make(kind, rid, **fields))], copy=False)
        except zmq.Again:
            pass  # no connection to it: the wait below times out, saying why
        deadline, last_look = time.monotonic() + timeout, _LAST_LOOK
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # a last look at what is queued already: a bounded one, the peer may flood
                last_look -= 1
            if last_look < 0 or not self.socket.poll(max(0, int(remaining * 1000) + 1)):
                raise multiprocessing.TimeoutError(f"no reply from the broker within {timeout:g} s")
            _, *frames = self.socket.recv_multipart(copy=False)
            try:
                reply = m.check(unpack([frame.buffer for frame in frames]))
            except ProtocolError as e:
                raise FarmError(f"envfarm: the broker at {self.endpoint} sent a malformed message ({e})") from None
            if reply["rid"] != rid and not (reply["kind"] == m.ERROR and reply["rid"] == 0):
                continue  # the late reply to a request given up on (rid 0: the broker could not read this one)
            if reply["kind"] == m.ERROR:
                raise rebuild(ErrorInfo.from_data(reply["error"]), f"the broker at {self.endpoint}")
            return reply

    def lease(self, fields: dict[str, Any], timeout: float) -> tuple[list[LeasedWorker], float]:
        """Leases workers for `fields["envs"]` envs (LEASE's fields); returns them, in the order their
        blocks of envs follow one another, and the broker's dead_after.

        Raises what `ask` raises, and FarmError for a lease that does not add up (a worker
        described wrongly, no slot, or fewer slots than envs): a broker bug or an impostor, named.
        """
        reply = self.ask(m.LEASE, fields, timeout)

        def malformed(why: str) -> FarmError:
            return FarmError(f"envfarm: the broker at {self.endpoint} sent a lease that does not add up: {why}")

        if reply["kind"] != m.LEASED:
            raise malformed(f"a {m.describe(reply['kind'])} message, not {m.LEASED!r}")
        workers, dead_after = reply["workers"], reply["dead_after"]
        if not 0 < dead_after < float("inf"):
            raise malformed(f"dead_after {m.describe(dead_after)}")
        leased = []
        for entry in workers:
            if not isinstance(entry, list) or len(entry) != 5:
                raise malformed(f"a worker entry {m.describe(entry)}, not [identity, slots, host, pid, key]")
            worker = LeasedWorker(*entry)
            if not (
                isinstance(worker.identity, bytes)
                and worker.identity.startswith(m.WORKER_PREFIX)
                and type(worker.slots) is int
                and worker.slots >= 1
                and isinstance(worker.host, str)
                and (worker.pid is None or type(worker.pid) is int)
                and (worker.key is None or isinstance(worker.key, str))
            ):
                raise malformed(f"a worker entry {[m.describe(value) for value in entry]}")
            if sum(w.slots for w in leased) >= fields["envs"]:
                raise malformed(f"more workers than {fields['envs']} envs need (one would have none)")
            leased.append(worker)
        if sum(worker.slots for worker in leased) < fields["envs"]:
            raise malformed(f"{sum(w.slots for w in leased)} slots for {fields['envs']} envs")
        return leased, dead_after

    def release(self, timeout: float) -> None:
        """Gives every lease back: the workers are free for other trainers.

        Raises:
            multiprocessing.TimeoutError: No reply within `timeout` seconds.
            FarmError: The broker did not release them (it says why).
        """
        try:
            self.ask(m.RELEASE, {}, timeout)
        except (multiprocessing.TimeoutError, FarmError):
            raise
        except Exception as e:  # the broker's ERROR, rebuilt: whatever its class, the leases stand
            raise FarmError(f"envfarm: the broker at {self.endpoint} did not release this trainer's leases: {e}") from e
        self.released = True

    def close(self) -> None:
        """Stops the heartbeat; gives the leases back, best effort, if `release` was not said."""
        self._heartbeat.stop()
        if not self.released:
            try:
                self.socket.send_multipart([b"", *pack(m.make(m.RELEASE, self._next_rid + 1))], zmq.NOBLOCK)
                self.socket.close(linger=500)
            except zmq.ZMQError:
                pass
        self.context.destroy(linger=0)


class BrokerHeartbeat(threading.Thread):
    """Tells the broker, from a socket of its own, that this trainer is alive, even while the
    trainer's thread is busy elsewhere (a broker releases the lease of a trainer gone silent)."""

    def __init__(self, endpoint: str, identity: bytes, curve: tuple[KeyPair, bytes] | None):
        super().__init__(name="envfarm-heartbeat", daemon=True)
        self.endpoint, self.identity, self.curve = endpoint, identity, curve
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.identity)
        socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            secure_client(socket, *self.curve)
        socket.connect(self.endpoint)
        try:
            while not self._stopped.wait(m.HEARTBEAT_INTERVAL):
                try:
                    socket.send(m.HEARTBEAT_FRAME, zmq.NOBLOCK)
                except zmq.Again:  # the broker is away; it hears from us again when it is back
                    pass
        finally:
            socket.close(linger=0)
            context.term()

    def stop(self) -> None:
        self._stopped.set()
        self.join(2)
