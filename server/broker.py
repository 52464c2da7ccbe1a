"""The standalone broker: one ROUTER socket that leases workers to trainers and forwards between them.

    envfarm broker --bind tcp://0.0.0.0:5555
    envfarm worker --broker tcp://HEAD:5555 --slots 8
    envs = envfarm.make_vec("CartPole-v1", 16, broker="tcp://HEAD:5555")

Peers say what they are with their routing identity: a worker's starts with b"W", a trainer's with
b"T". A worker registers with HELLO and its slot count. A trainer sends [target, *message]: an
empty target addresses the broker (LEASE n envs' worth of workers, RELEASE them), any other target
is one of the workers it leased, to which the message is forwarded untouched; the worker's replies
go back to its lessee as [worker, *message]. The broker decodes only its own control messages and
HELLO, never with pickles. A trainer's workers are released when it asks or leases anew; released workers are told to
close their envs. Workers and trainers send heartbeats (a trainer from a thread of its own, on a
second socket whose identity is its own plus HEARTBEAT_SUFFIX); a worker silent for `dead_after`
is declared lost to its trainer, a trainer silent that long loses its lease.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from envfarm.curve import secure_server
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack

MAX_MESSAGE_BYTES = 256 << 20  # a socket facing the network refuses larger frames


@dataclass
class RegisteredWorker:
    identity: bytes
    slots: int
    host: str
    pid: int
    lessee: bytes | None = None
    last_seen: float = field(default_factory=time.monotonic)
    forwarded: int = 0  # requests forwarded to it, for `envfarm status`


def set_tcp_heartbeats(socket: zmq.Socket) -> None:
    """ZMTP heartbeats: a dead host or a half-open TCP connection is noticed and reconnected."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    socket.setsockopt(zmq.HEARTBEAT_TTL, 3000)


class Broker:
    """Serves one ROUTER socket until `stop()`."""

    def __init__(self, bind: str, dead_after: float = 5.0, curve: tuple[str, str] | None = None):
        """`dead_after`: a worker silent this long (no heartbeat, no reply: dead, frozen, cut off,
        or stuck in one request) is declared lost, and its lessee told at once.
        `curve`: (this broker's secret key file, directory of admitted public keys): CurveZMQ."""
        if dead_after <= 2 * m.HEARTBEAT_INTERVAL:
            raise ValueError(f"dead_after must exceed two heartbeat intervals ({2 * m.HEARTBEAT_INTERVAL} s), got {dead_after}")
        self.dead_after = dead_after
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a worker that reconnects keeps its identity
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        set_tcp_heartbeats(self.socket)
        self._authenticator = secure_server(self.context, self.socket, *curve) if curve is not None else None
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, RegisteredWorker] = {}
        self.trainers: dict[bytes, float] = {}  # trainers holding a lease: when each was last heard from
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        try:
            next_check = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_check:
                    self._declare_lost(now - self.dead_after)
                    next_check = now + 0.1
                if not self.socket.poll(100):
                    continue
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
            if sender.startswith(m.WORKER_PREFIX):
                self._from_worker(sender, frames)
            elif sender.startswith(m.TRAINER_PREFIX) and sender.endswith(m.HEARTBEAT_SUFFIX):
                trainer = sender[: -len(m.HEARTBEAT_SUFFIX)]
                if trainer in self.trainers:
                    self.trainers[trainer] = time.monotonic()
            elif sender.startswith(m.TRAINER_PREFIX) and frames:
                if sender in self.trainers:
                    self.trainers[sender] = time.monotonic()
                self._from_trainer(sender, frames[0].bytes, frames[1:])

    def _send(self, frames: list[Any]) -> None:
        # Never blocks: a peer that is gone (EHOSTUNREACH) or does not read (its queue is full:
        # EAGAIN, e.g. a frozen trainer) loses the message instead of stalling the whole farm.
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise

    def _declare_lost(self, silent_since: float) -> None:
        for trainer in [t for t, last_seen in self.trainers.items() if last_seen < silent_since]:
            self._release(trainer)  # it vanished (killed, or its host did): its workers go back to the pool
        for record in [r for r in self.workers.values() if r.last_seen < silent_since]:
            del self.workers[record.identity]
            if record.lessee is not None:
                reason = f"was silent for more than {self.dead_after:g} s (killed, frozen, cut off, or stuck in one request)"
                self._send([record.lessee, record.identity, *pack(m.make(m.LOST, 0, reason=reason))])

    def _from_worker(self, worker: bytes, frames: list[zmq.Frame]) -> None:
        record = self.workers.get(worker)
        if record is not None:
            record.last_seen = time.monotonic()
        if len(frames) == 1 and frames[0].bytes == m.HEARTBEAT_FRAME:
            if record is None:  # a worker this broker does not know: reset it, so that it registers
                self._send([worker, *pack(m.make(m.CLOSE, 0))])
            return
        if record is None or record.lessee is None:
            try:
                hello = m.check(unpack([f.buffer for f in frames]))
            except ProtocolError:
                return
            if hello["kind"] == m.HELLO and record is None:
                slots = hello.get("slots", 1)
                self.workers[worker] = RegisteredWorker(worker, slots if type(slots) is int and slots > 0 else 1, hello["host"], hello["pid"])
            return
        self._send([record.lessee, worker, *frames])

    def _from_trainer(self, trainer: bytes, target: bytes, frames: list[zmq.Frame]) -> None:
        if target:
            record = self.workers.get(target)
            if record is not None and record.lessee == trainer:
                record.forwarded += 1
                self._send([target, *frames])
            else:  # never leased to it, lost, or the broker restarted: the trainer must not wait for a reply
                reason = "is not leased to this trainer (lost, or the broker restarted)"
                self._send([trainer, target, *pack(m.make(m.LOST, 0, reason=reason))])
            return
        rid = 0
        try:
            message = m.check(unpack([f.buffer for f in frames]))
            rid = message["rid"]
            reply = self._control(trainer, message)
        except Exception as exc:
            reply = m.make(m.ERROR, rid, error=ErrorInfo.from_exception(exc).to_data())
        self._send([trainer, b"", *pack(reply)])

    def _control(self, trainer: bytes, message: dict[str, Any]) -> dict[str, Any]:
        kind, rid = message["kind"], message["rid"]
        if kind == m.LEASE:
            if not message.get("add"):  # a new lease replaces the trainer's last one; add=True extends it
                self._release(trainer)
            wanted, leased = message["envs"], []
            for record in self.workers.values():
                if wanted <= 0:
                    break
                if record.lessee is None:
                    record.lessee = trainer
                    leased.append(record)
                    wanted -= record.slots
            if wanted > 0:
                for record in leased:
                    record.lessee = None
                free = sum(r.slots for r in self.workers.values() if r.lessee is None)
                raise RuntimeError(f"the farm has {free} free slots, {message['envs']} were asked for")
            self.trainers[trainer] = time.monotonic()
            return m.make(m.LEASED, rid, workers=[[r.identity, r.slots, r.host, r.pid] for r in leased])
        if kind == m.RELEASE:
            self._release(trainer)
            return m.make(m.RESULT, rid, errors=[])
        if kind == m.STATUS:
            now = time.monotonic()
            workers = [
                {"id": r.identity.hex(), "host": r.host, "pid": r.pid, "slots": r.slots, "leased_to": r.lessee.hex() if r.lessee else None,
                 "silent_s": round(now - r.last_seen, 1), "forwarded": r.forwarded}
                for r in self.workers.values()
            ]
            return m.make(m.RESULT, rid, errors=[], workers=workers, trainers=len(self.trainers))
        raise ProtocolError(f"the broker does not serve {kind} messages")

    def _release(self, trainer: bytes) -> None:
        """Frees the trainer's workers; each is told to close its envs and wait for the next lease."""
        self.trainers.pop(trainer, None)
        for record in self.workers.values():
            if record.lessee == trainer:
                record.lessee = None
                self._send([record.identity, *pack(m.make(m.CLOSE, 0))])
