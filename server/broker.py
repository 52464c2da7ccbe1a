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

The broker decodes only control messages, never with pickles, and never blocks on a peer. Every
field it reads is checked against a bounded schema first (`messages.check_control`), and whatever a
message does, it is that peer's problem only: the broker goes on serving the others.

With CurveZMQ, identities are bound to keys: a worker's to the key it registered with, a trainer's
to the key it leased with, or after a restart to the key its workers report (JOIN told them). With
role directories (`envfarm.curve.load_roles`) a key may do only what its role allows: workers
register, trainers lease, release and ask STATUS, admins ask STATUS.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import ipaddress
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.transport.curve import ADMINS, TRAINERS, WORKERS, load_key_pair, load_roles, secure_server
from envfarm.transport.sockets import zmtp_heartbeats

MAX_MESSAGE_BYTES = 1 << 20  # control messages are small; a socket facing the network refuses larger frames
_TCP_ENDPOINT = re.compile(r"tcp://[^\s/]+:\d{1,5}")
FRESH_HEARTBEATS = 2.5  # a worker is leased out only if heard from within this many heartbeat intervals
MAX_WORKERS = 10_000  # registrations kept at most: a flood of identities cannot grow the registry without end


@dataclass
class RegisteredWorker:
    identity: bytes
    slots: int
    host: str
    pid: int
    key: str | None  # the CurveZMQ public key (z85) it proved when it registered; handed to its lessee
    allow: list[str] | None  # the env id patterns it builds (None: any id registered there)
    allows: re.Pattern[str] | None  # `allow`, compiled once: a lease then costs one match per worker
    lessee: bytes | None = None
    lease: str | None = None  # the token of its current lease
    joined: bool = False  # it has reported serving `lease`: from then on, reporting another means it left
    steps: int = 0  # env steps it has served (its own count, reported with each heartbeat)
    steps_per_s: float = 0.0  # over its last heartbeat interval, for `envfarm status`
    last_seen: float = field(default_factory=time.monotonic)


log = logging.getLogger("envfarm.broker")


def _short(identity: bytes) -> str:
    """An identity as `envfarm status` shows it: cut short, for a whole one lets a peer speak for it."""
    return identity.hex()[:12]


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


@functools.lru_cache(maxsize=256)  # a farm's workers mostly share a few allow-lists
def _compile_allow(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression that matches the env ids any of the fnmatch patterns matches (none
    matches nothing)."""
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns) or "(?!)")


class Broker:
    """Serves one ROUTER socket until `stop()`."""

    def __init__(
        self, bind: str, dead_after: float = 5.0, curve: tuple[str, str] | None = None, max_workers: int = MAX_WORKERS
    ):
        """`dead_after`: a worker silent this long (dead, frozen, cut off, or stuck in one request)
        is struck off; trainers use the same deadline for the workers they lease.
        `curve`: (this broker's secret key file, directory of admitted public keys): CurveZMQ. The
        directory holds the keys of each role in `workers/`, `trainers/` and `admins/`, or all keys
        in itself (each then may do everything). `max_workers`: registrations it keeps at most."""
        if dead_after <= 2 * m.HEARTBEAT_INTERVAL:
            raise ValueError(
                f"dead_after must exceed two heartbeat intervals ({2 * m.HEARTBEAT_INTERVAL} s), got {dead_after}"
            )
        self.dead_after = dead_after
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that connects again under its identity takes it over. Without this, libzmq leaves
        # a connection refused for an identity in use silent for good (its messages dropped), even
        # once the old one is gone: a trainer or worker reconnecting after a network blip, before
        # the broker noticed its old connection die, would never be heard again, nor would a
        # trainer whose identity another listed key had connected under first. Taking an identity
        # over gains a peer nothing: every message is checked against the key bound to it.
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        zmtp_heartbeats(self.socket)
        self._authenticator = None
        self.roles: dict[str, frozenset[str]] | None = None  # with Curve role directories: each key's roles
        if curve is not None:
            self.roles = load_roles(curve[1])
            roles = self.roles
            admitted = curve[1] if roles is None else (lambda key: key.decode("ascii", "replace") in roles)
            self._authenticator = secure_server(self.context, self.socket, load_key_pair(curve[0]), admitted)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.max_workers = max_workers
        self.workers: dict[bytes, RegisteredWorker] = {}
        self.trainers: dict[bytes, float] = {}  # trainers holding a lease: when each was last heard from
        self.trainer_keys: dict[bytes, str | None] = {}  # the key each of them is bound to (without Curve, None)
        self.counts: collections.Counter[str] = collections.Counter()  # for the metrics (server/metrics.py)
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
            try:
                self._handle(identity.bytes, frames)
            except Exception as exc:  # a bug that one peer's message reached: that peer's problem only
                info = ErrorInfo.from_exception(exc)
                log.warning(
                    "dropped a message from %s: %s", _short(identity.bytes), f"{info.type}: {info.message}"[:400]
                )

    def _handle(self, sender: bytes, frames: list[zmq.Frame]) -> None:
        if not frames:
            return
        key = _frame_property(frames[0], "User-Id") or None  # with Curve: the sender's public key, proven
        if sender.startswith(m.WORKER_PREFIX):
            if self._may(key, WORKERS):
                self._from_worker(sender, [f.bytes for f in frames], key)
        elif sender.startswith(m.TRAINER_PREFIX) and sender.endswith(m.HEARTBEAT_SUFFIX):
            trainer = sender[: -len(m.HEARTBEAT_SUFFIX)]
            if trainer in self.trainers and self._speaks_for(trainer, key):
                self.trainers[trainer] = time.monotonic()
        elif sender.startswith(m.TRAINER_PREFIX) and len(frames) > 1 and frames[0].bytes == b"":
            if not self._speaks_for(sender, key):
                return
            if sender in self.trainers:
                self.trainers[sender] = time.monotonic()
            self._from_trainer(sender, [f.bytes for f in frames[1:]], _frame_property(frames[0], "Peer-Address"), key)

    def _may(self, key: str | None, role: str) -> bool:
        """Whether the peer that proved `key` holds `role`. Without role directories (no Curve, or
        one directory of keys) every peer holds every role."""
        return self.roles is None or role in self.roles.get(key or "", ())

    def _speaks_for(self, trainer: bytes, key: str | None) -> bool:
        """Whether a message under this trainer's identity comes from the key that holds it. A
        lease-holding trainer's identity is bound to one key (without Curve, None): the one it
        leased with, or after a broker restart the one its workers report."""
        return trainer not in self.trainers or self.trainer_keys.get(trainer) == key

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
            log.info("trainer %s silent for %g s: its lease ends", _short(trainer), self.dead_after)
            self.counts["trainers_lost"] += 1
            self._release(trainer)  # it vanished (killed, or its host did): its workers go back to the pool
        for record in [r for r in self.workers.values() if r.last_seen < silent_since]:
            log.info(
                "worker %s (%s, pid %d) silent for %g s: struck off",
                _short(record.identity),
                record.host,
                record.pid,
                self.dead_after,
            )
            self.counts["workers_lost"] += 1
            del self.workers[record.identity]

    def _from_worker(self, worker: bytes, frames: list[bytes], key: str | None) -> None:
        try:
            hello = m.check_control(unpack(frames))
        except ProtocolError:
            return
        if hello["kind"] != m.HELLO:
            return  # workers send the broker nothing else
        lease, lessee, steps = hello["lease"], hello["lessee"], hello["steps"]
        record = self.workers.get(worker)
        if record is not None and record.key != key:
            return  # another key under a registered worker's identity: not that worker
        if record is None:
            if len(self.workers) >= self.max_workers:
                return  # full: it is registered once a place frees up (a silent worker is struck off)
            allow = hello["allow"]
            record = RegisteredWorker(
                worker,
                hello["slots"],
                hello["host"],
                hello["pid"],
                key,
                allow,
                _compile_allow(tuple(allow)) if allow is not None else None,
            )
            self.workers[worker] = record
            log.info(
                "worker %s registered: %s, pid %d, %d slots", _short(worker), record.host, record.pid, record.slots
            )
            if lease is not None and lessee is not None and lessee.startswith(m.TRAINER_PREFIX):
                self._adopt(record, lease, lessee, hello.get("trainer_key"))
        now = time.monotonic()
        record.steps_per_s = max(0, steps - record.steps) / max(now - record.last_seen, 1e-3)
        self.counts["env_steps"] += max(0, steps - record.steps)
        record.steps = steps
        record.last_seen = now
        if record.lessee is not None:
            if lease == record.lease:
                record.joined = True
            elif record.joined:  # it left its lease (its trainer closed it, or gave it up for lost)
                record.lessee, record.lease, record.joined = None, None, False

    def _adopt(self, record: RegisteredWorker, lease: str, lessee: bytes, trainer_key: str | None) -> None:
        """A newly registered worker serves a lease this broker has not seen (it restarted): the
        lease stands until its trainer goes silent or releases it. With Curve, the trainer's identity
        is bound to the key the worker reports that trainer leased with, so that no other key can
        speak for it (every leased worker learns a trainer's identity in JOIN, and could otherwise
        claim it first). A lease that cannot be bound so is ended."""
        bound = trainer_key if record.key is not None else None  # without Curve, trainers are bound to None
        if record.key is not None and (trainer_key is None or not self._may(trainer_key, TRAINERS)):
            log.warning(
                "worker %s reports a lease of trainer %s without a trainer key it may hold: lease ended",
                _short(record.identity),
                _short(lessee),
            )
            self._send([record.identity, *pack(m.make(m.CLOSE, 0))])
            return
        if lessee in self.trainers and self.trainer_keys.get(lessee) != bound:
            log.warning(
                "worker %s reports trainer %s with another key than its other workers: lease ended",
                _short(record.identity),
                _short(lessee),
            )
            self._send([record.identity, *pack(m.make(m.CLOSE, 0))])  # its workers disagree on the key: one lies
            return
        log.info(
            "worker %s serves trainer %s's lease from before this broker started: kept",
            _short(record.identity),
            _short(lessee),
        )
        record.lessee, record.lease, record.joined = lessee, lease, True
        self.trainers.setdefault(lessee, time.monotonic())
        self.trainer_keys[lessee] = bound

    def _from_trainer(self, trainer: bytes, frames: list[bytes], peer_address: str, key: str | None) -> None:
        rid = 0
        try:
            message = unpack(frames)
            rid = message["rid"] if type(message.get("rid")) is int else 0
            reply = self._control(trainer, m.check_control(message), peer_address, key)
        except Exception as exc:
            reply = m.make(m.ERROR, rid, error=ErrorInfo.from_exception(exc).to_data())
            self.counts["refused"] += 1
            log.info("trainer %s: refused: %s", _short(trainer), f"{type(exc).__name__}: {exc}"[:300])
        self._send([trainer, b"", *pack(reply)])

    def _control(self, trainer: bytes, message: dict[str, Any], peer_address: str, key: str | None) -> dict[str, Any]:
        kind, rid = message["kind"], message["rid"]
        if not self._may(key, TRAINERS) and not (kind == m.STATUS and self._may(key, ADMINS)):
            raise PermissionError(f"this key may not send {kind}: it is not among the broker's {TRAINERS} keys")
        if kind == m.LEASE:
            if not _TCP_ENDPOINT.fullmatch(message["endpoint"]):
                raise ProtocolError(f"a trainer's endpoint must be tcp://host:port, got {message['endpoint']!r:.80}")
            return self._lease(trainer, message, _reachable(message["endpoint"], peer_address), key)
        if kind == m.RELEASE:
            self._release(trainer)
            return m.make(m.RESULT, rid, errors=[])
        if kind == m.STATUS:
            now = time.monotonic()
            workers = [
                # Ids are cut short: a peer that knew a trainer's whole identity could speak for it.
                {
                    "id": _short(r.identity),
                    "host": r.host,
                    "pid": r.pid,
                    "slots": r.slots,
                    "leased_to": _short(r.lessee) if r.lessee else None,
                    "silent_s": round(now - r.last_seen, 1),
                    "steps": r.steps,
                    "steps_per_s": round(r.steps_per_s, 1),
                }
                for r in self.workers.values()
            ]
            # `you`: the address this broker sees the asker at, where a trainer on its host binds
            return m.make(
                m.RESULT, rid, errors=[], workers=workers, trainers=len(self.trainers), you=peer_address or ""
            )
        raise ProtocolError(f"the broker does not serve {kind} messages")

    def _lease(self, trainer: bytes, message: dict[str, Any], endpoint: str, key: str | None) -> dict[str, Any]:
        """Picks free workers with enough slots for `envs` and sends each JOIN. A new lease
        replaces the trainer's last one, unless add=True: one more worker that hosts all `envs`
        (a lost worker's replacement)."""
        wanted, env_id = message["envs"], message["env_id"]
        if message.get("add"):
            free = self._free_workers(env_id)
            leased = [r for r in free if r.slots >= wanted][:1]
            if not leased:
                raise RuntimeError(
                    f"the farm has no free worker with {wanted} slots for {env_id!r} (free: {sorted(r.slots for r in free)})"
                )
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
                raise RuntimeError(
                    f"the farm has {sum(r.slots for r in free)} free slots for {env_id!r}{besides}, {message['envs']} were asked for"
                )
        for record in leased:
            record.lessee, record.lease, record.joined = trainer, secrets.token_hex(8), False
            join = m.make(
                m.JOIN,
                0,
                endpoint=endpoint,
                server_key=message["server_key"],
                lease=record.lease,
                trainer=trainer,
                trainer_key=key,
            )
            self._send([record.identity, *pack(join)])
        self.trainers[trainer] = time.monotonic()
        self.trainer_keys[trainer] = key  # the lease binds the identity to this key
        self.counts["restarts" if message.get("add") else "leases"] += 1
        log.info(
            "trainer %s leased %s for %d envs of %s%s",
            _short(trainer),
            ", ".join(f"{_short(r.identity)} ({r.host}, {r.slots} slots)" for r in leased),
            message["envs"],
            env_id,
            " (a replacement)" if message.get("add") else "",
        )
        workers = [[r.identity, r.slots, r.host, r.pid, r.key] for r in leased]
        return m.make(m.LEASED, message["rid"], workers=workers, dead_after=self.dead_after)

    def _free_workers(self, env_id: str | None = None) -> list[RegisteredWorker]:
        """Unleased workers that were heard from lately (one that died a moment ago is not leased
        out) and, given `env_id`, that allow it."""
        heard_since = time.monotonic() - FRESH_HEARTBEATS * m.HEARTBEAT_INTERVAL
        return [
            r
            for r in self.workers.values()
            if r.lessee is None
            and r.last_seen >= heard_since
            and (env_id is None or r.allows is None or r.allows.match(env_id) is not None)
        ]

    def _release(self, trainer: bytes) -> None:
        """Frees the trainer's workers; each is told to close its envs and wait for the next lease."""
        if trainer in self.trainers:
            log.info("trainer %s released its workers", _short(trainer))
        self.trainers.pop(trainer, None)
        self.trainer_keys.pop(trainer, None)
        for record in self.workers.values():
            if record.lessee == trainer:
                record.lessee, record.lease, record.joined = None, None, False
                self._send([record.identity, *pack(m.make(m.CLOSE, 0))])
