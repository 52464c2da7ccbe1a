"""The standalone broker: one ROUTER socket where workers register and trainers lease them.

    envfarm broker --bind tcp://0.0.0.0:5555
    envfarm worker --broker tcp://HEAD:5555 --slots 8
    envs = envfarm.make_vec("CartPole-v1", 16, broker="tcp://HEAD:5555")

Peers say what they are with their routing identity: a worker's starts with b"W", a trainer's with
b"T". A worker registers, and then keeps saying it is alive, with HELLO. A trainer LEASEs enough
workers for its envs, giving the endpoint of its own data socket; the broker sends each leased
worker JOIN with that endpoint, and from then on the trainer and its workers talk directly: no
step passes through the broker. A trainer's workers are released when it asks, leases anew, or
stops sending heartbeats (from a thread of its own, on a second socket whose identity is its own
plus HEARTBEAT_SUFFIX); released workers are told to CLOSE. A worker silent for `dead_after` is
struck off (its trainer, which hears the worker's own heartbeats, notices by itself). Because
workers report the lease they serve, a restarted broker learns who holds what from them, and
trainers train on through the restart.

The broker decodes only control messages, never with pickles, and never blocks on a peer.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from envfarm.curve import load_key_pair, secure_server
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack

MAX_MESSAGE_BYTES = 1 << 20  # control messages are small; a socket facing the network refuses larger frames
_TCP_ENDPOINT = re.compile(r"tcp://[^\s/]+:\d{1,5}")
_FRESH_HEARTBEATS = 2.5  # a worker is leased out only if heard from within this many heartbeat intervals


@dataclass
class RegisteredWorker:
    identity: bytes
    slots: int
    host: str
    pid: int
    key: str | None  # the CurveZMQ public key (z85) it proved when it registered; handed to its lessee
    allow: list[str] | None  # the env id patterns it builds (None: any id registered there)
    lessee: bytes | None = None
    lease: str | None = None  # the token of its current lease
    joined: bool = False  # it has reported serving `lease`: from then on, reporting another means it left
    steps: int = 0  # env steps it has served (its own count, reported with each heartbeat)
    steps_per_s: float = 0.0  # over its last heartbeat interval, for `envfarm status`
    last_seen: float = field(default_factory=time.monotonic)


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except zmq.ZMQError:  # a transport or mechanism without it (inproc; no Curve)
        return ""


def _reachable(endpoint: str, peer_address: str) -> str:
    """A trainer's data endpoint as its workers can reach it. A trainer on the broker's host, which
    reaches it on loopback, advertises a loopback address; if the broker sees it from elsewhere
    (its port is published from a container), that address is where the workers find it too."""
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    try:
        if ipaddress.ip_address(host).is_loopback and not ipaddress.ip_address(peer_address).is_loopback:
            return f"tcp://{peer_address}:{port}"
    except ValueError:  # a host name, or no peer address (ipc): as given
        pass
    return endpoint


def set_tcp_heartbeats(socket: zmq.Socket) -> None:
    """ZMTP heartbeats: a dead host or a half-open TCP connection is noticed and reconnected."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    socket.setsockopt(zmq.HEARTBEAT_TTL, 3000)


class Broker:
    """Serves one ROUTER socket until `stop()`."""

    def __init__(self, bind: str, dead_after: float = 5.0, curve: tuple[str, str] | None = None):
        """`dead_after`: a worker silent this long (dead, frozen, cut off, or stuck in one request)
        is struck off; trainers use the same deadline for the workers they lease.
        `curve`: (this broker's secret key file, directory of admitted public keys): CurveZMQ."""
        if dead_after <= 2 * m.HEARTBEAT_INTERVAL:
            raise ValueError(f"dead_after must exceed two heartbeat intervals ({2 * m.HEARTBEAT_INTERVAL} s), got {dead_after}")
        self.dead_after = dead_after
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No ROUTER_HANDOVER: a second connection under an identity in use is refused rather than
        # handed the first one's messages (a reconnecting peer gets in once ZMTP heartbeats have
        # closed its old connection, within HEARTBEAT_TIMEOUT).
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        set_tcp_heartbeats(self.socket)
        self._authenticator = None
        if curve is not None:
            self._authenticator = secure_server(self.context, self.socket, load_key_pair(curve[0]), curve[1])
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, RegisteredWorker] = {}
        self.trainers: dict[bytes, float] = {}  # trainers holding a lease: when each was last heard from
        self.trainer_keys: dict[bytes, str | None] = {}  # with Curve, the key each of them proved
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        try:
            next_check = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_check:
                    self._strike_off_silent(now - self.dead_after)
                    next_check = now + 0.1
                if self.socket.poll(100):
                    self._drain()
        finally:
            self.socket.close(linger=0)
            if self._authenticator is not None:
                self._authenticator.stop()
            self.context.term()

    def _drain(self) -> None:
        """Handles every message already queued, without a poll between them."""
        while True:
            try:
                identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            sender = identity.bytes
            if not frames:
                continue
            key = _frame_property(frames[0], "User-Id") or None  # with Curve: the sender's public key, proven
            if sender.startswith(m.WORKER_PREFIX):
                self._from_worker(sender, [f.bytes for f in frames], key)
            elif sender.startswith(m.TRAINER_PREFIX) and sender.endswith(m.HEARTBEAT_SUFFIX):
                trainer = sender[: -len(m.HEARTBEAT_SUFFIX)]
                if trainer in self.trainers and self._speaks_for(trainer, key):
                    self.trainers[trainer] = time.monotonic()
            elif sender.startswith(m.TRAINER_PREFIX) and len(frames) > 1 and frames[0].bytes == b"":
                if not self._speaks_for(sender, key):
                    continue
                if sender in self.trainers:
                    self.trainers[sender] = time.monotonic()
                self._from_trainer(sender, [f.bytes for f in frames[1:]], _frame_property(frames[0], "Peer-Address"))
                self._speaks_for(sender, key)  # a lease just made binds the identity to this key

    def _speaks_for(self, trainer: bytes, key: str | None) -> bool:
        """Whether a message under this trainer's identity comes from the key that holds it. A
        lease-holding trainer's identity is bound to the first key seen under it from then on
        (its own: the one it leased with; without Curve, None)."""
        return self.trainer_keys.setdefault(trainer, key) == key if trainer in self.trainers else True

    def _send(self, frames: list[Any]) -> None:
        # Never blocks: a peer that is gone (EHOSTUNREACH) or does not read (its queue is full:
        # EAGAIN, e.g. a frozen trainer) loses the message instead of stalling the whole farm.
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise

    def _strike_off_silent(self, silent_since: float) -> None:
        for trainer in [t for t, last_seen in self.trainers.items() if last_seen < silent_since]:
            self._release(trainer)  # it vanished (killed, or its host did): its workers go back to the pool
        for record in [r for r in self.workers.values() if r.last_seen < silent_since]:
            del self.workers[record.identity]

    def _from_worker(self, worker: bytes, frames: list[bytes], key: str | None) -> None:
        try:
            hello = m.check(unpack(frames))
        except ProtocolError:
            return
        if hello["kind"] != m.HELLO:
            return  # workers send the broker nothing else
        lease, lessee, steps = hello.get("lease"), hello.get("lessee"), hello.get("steps")
        record = self.workers.get(worker)
        if record is not None and record.key != key:
            return  # another key under a registered worker's identity: not that worker
        if record is None:
            slots, allow = hello.get("slots"), hello.get("allow")
            record = RegisteredWorker(
                worker, slots if type(slots) is int and slots > 0 else 1, hello["host"], hello["pid"], key,
                [str(pattern) for pattern in allow] if isinstance(allow, list) else None,
            )
            self.workers[worker] = record
            if isinstance(lease, str) and isinstance(lessee, bytes) and lessee.startswith(m.TRAINER_PREFIX):
                # It serves a lease this broker has not seen (it restarted): the lease stands until
                # its trainer goes silent or releases it.
                record.lessee, record.lease, record.joined = lessee, lease, True
                self.trainers.setdefault(lessee, time.monotonic())
        now = time.monotonic()
        if type(steps) is int:
            record.steps_per_s = max(0, steps - record.steps) / max(now - record.last_seen, 1e-3)
            record.steps = steps
        record.last_seen = now
        if record.lessee is not None:
            if lease == record.lease:
                record.joined = True
            elif record.joined:  # it left its lease (its trainer closed it, or gave it up for lost)
                record.lessee, record.lease, record.joined = None, None, False

    def _from_trainer(self, trainer: bytes, frames: list[bytes], peer_address: str) -> None:
        rid = 0
        try:
            message = m.check(unpack(frames))
            rid = message["rid"]
            reply = self._control(trainer, message, peer_address)
        except Exception as exc:
            reply = m.make(m.ERROR, rid, error=ErrorInfo.from_exception(exc).to_data())
        self._send([trainer, b"", *pack(reply)])

    def _control(self, trainer: bytes, message: dict[str, Any], peer_address: str) -> dict[str, Any]:
        kind, rid = message["kind"], message["rid"]
        if kind == m.LEASE:
            if not _TCP_ENDPOINT.fullmatch(message["endpoint"]):
                raise ProtocolError(f"a trainer's endpoint must be tcp://host:port, got {message['endpoint']!r:.80}")
            if message["server_key"] is not None and len(message["server_key"]) != 40:
                raise ProtocolError("a trainer's server_key must be a Curve public key: 40 characters of z85")
            return self._lease(trainer, message, _reachable(message["endpoint"], peer_address))
        if kind == m.RELEASE:
            self._release(trainer)
            return m.make(m.RESULT, rid, errors=[])
        if kind == m.STATUS:
            now = time.monotonic()
            workers = [
                # Ids are cut short: a peer that knew a trainer's whole identity could speak for it.
                {"id": r.identity.hex()[:12], "host": r.host, "pid": r.pid, "slots": r.slots, "leased_to": r.lessee.hex()[:12] if r.lessee else None,
                 "silent_s": round(now - r.last_seen, 1), "steps": r.steps, "steps_per_s": round(r.steps_per_s, 1)}
                for r in self.workers.values()
            ]
            return m.make(m.RESULT, rid, errors=[], workers=workers, trainers=len(self.trainers))
        raise ProtocolError(f"the broker does not serve {kind} messages")

    def _lease(self, trainer: bytes, message: dict[str, Any], endpoint: str) -> dict[str, Any]:
        """Picks free workers with enough slots for `envs` and sends each JOIN. A new lease
        replaces the trainer's last one, unless add=True: one more worker that hosts all `envs`
        (a lost worker's replacement)."""
        wanted, env_id = message["envs"], message["env_id"]
        if message.get("add"):
            free = self._free_workers(env_id)
            leased = [r for r in free if r.slots >= wanted][:1]
            if not leased:
                raise RuntimeError(f"the farm has no free worker with {wanted} slots for {env_id!r} (free: {sorted(r.slots for r in free)})")
        else:
            self._release(trainer)
            free, leased = self._free_workers(env_id), []
            for record in free:
                if wanted <= 0:
                    break
                leased.append(record)
                wanted -= record.slots
            if wanted > 0:
                others = sum(r.slots for r in self._free_workers()) - sum(r.slots for r in free)
                besides = f" (and {others} for other env ids)" if others else ""
                raise RuntimeError(f"the farm has {sum(r.slots for r in free)} free slots for {env_id!r}{besides}, {message['envs']} were asked for")
        for record in leased:
            record.lessee, record.lease, record.joined = trainer, secrets.token_hex(8), False
            join = m.make(m.JOIN, 0, endpoint=endpoint, server_key=message["server_key"], lease=record.lease, trainer=trainer)
            self._send([record.identity, *pack(join)])
        self.trainers[trainer] = time.monotonic()
        workers = [[r.identity, r.slots, r.host, r.pid, r.key] for r in leased]
        return m.make(m.LEASED, message["rid"], workers=workers, dead_after=self.dead_after)

    def _free_workers(self, env_id: str | None = None) -> list[RegisteredWorker]:
        """Unleased workers that were heard from lately (one that died a moment ago is not leased
        out) and, given `env_id`, that allow it."""
        heard_since = time.monotonic() - _FRESH_HEARTBEATS * m.HEARTBEAT_INTERVAL
        return [
            r for r in self.workers.values()
            if r.lessee is None and r.last_seen >= heard_since
            and (env_id is None or r.allow is None or any(fnmatch.fnmatchcase(env_id, pattern) for pattern in r.allow))
        ]

    def _release(self, trainer: bytes) -> None:
        """Frees the trainer's workers; each is told to close its envs and wait for the next lease."""
        self.trainers.pop(trainer, None)
        self.trainer_keys.pop(trainer, None)
        for record in self.workers.values():
            if record.lessee == trainer:
                record.lessee, record.lease, record.joined = None, None, False
                self._send([record.identity, *pack(m.make(m.CLOSE, 0))])
