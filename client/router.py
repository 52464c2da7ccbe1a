"""The trainer's side of the data path: fan-out of requests and gathering of replies by request id.

Workers connect to the trainer's ROUTER socket: local ones over ipc, farm workers over tcp once a
broker has leased them to this trainer. Each worker has a route (client/routes.py) chosen once:
the socket, its shared-memory channel, or inline. Every request gets a fresh id; a reply whose id
is not the one being gathered is a late reply to an abandoned request and is dropped, never
returned for the next call. While it waits, the router watches each local worker process (its
sentinel fd sits in the same poll as the socket) and each farm worker's heartbeats
(client/liveness.py), so a worker that dies, freezes or is cut off is reported by name within a
deadline instead of being waited for.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

import zmq

from envfarm.client.errors import WorkerDiedError
from envfarm.client.liveness import DISCONNECTED, LOOK_EVERY, FarmLiveness
from envfarm.client.routes import ChannelRoute, SocketRoute
from envfarm.client.worker_handle import WorkerHandle, exit_reason
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ProtocolError
from envfarm.protocol.packing import unpack
from envfarm.transport.channel import TrainerChannels
from envfarm.transport.curve import KeyPair, secure_server
from envfarm.transport.sockets import keep_alive

_CHANNEL_SLICE = 0.02  # seconds between looks at the socket and the processes while waiting on channels
_MAX_EARLY = 1024  # early HELLOs kept, at most
_MAX_EARLY_BYTES = 1024  # a HELLO is a few dozen bytes: a larger one is not kept
_FARM_RECEIVE_QUEUE = 64  # messages queued per peer, at most: a worker has one reply in flight; a flooder waits
_DRAIN_BUDGET = 256  # messages read from the socket between two looks at what is complete
_ADMISSION_WAIT = 2.0  # seconds a connecting worker's key may wait for the lease that admits it
MAX_FARM_FRAME_BYTES = 1 << 30  # the largest frame a farm trainer accepts: a worker's block of observations fits

Pending = dict[WorkerHandle, int]  # the request id awaited from each worker
Replies = dict[WorkerHandle, dict[str, Any]]


class Router:
    """Sends requests to workers by ownership and gathers their replies by request id."""

    def __init__(
        self,
        endpoint: str,
        *,
        trusted: bool,
        farm: bool = False,
        advertise: str | None = None,
        keys: KeyPair | None = None,
    ):
        """A ROUTER bound at `endpoint` that workers connect to. A `farm` trainer's port faces the
        network: what a stranger can make it buffer is bounded, and workers reach it at `advertise`
        (host) and its port. With `keys` (this trainer's Curve keys), it admits only the workers
        leased to it."""
        self.trusted = trusted
        self.farm = farm
        self.workers: dict[bytes, WorkerHandle] = {}
        self._sentinels: dict[int, WorkerHandle] = {}
        self._next_rid = 0
        self.channels: TrainerChannels | None = None
        self._early: dict[bytes, dict[str, Any]] = {}  # HELLOs of farm workers that beat their LEASED reply here
        self._admitted: set[bytes] = set()  # with keys: the public keys of the workers leased to this trainer
        self._admission = threading.Lock()
        self.server_key = keys[0].decode() if keys is not None else None
        self._next_drain = 0.0
        self._authenticator = None
        self.context = zmq.Context()
        try:
            self.socket = self.context.socket(zmq.ROUTER)
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer must fail, not vanish
            self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a farm worker that reconnects keeps its identity
            self.socket.setsockopt(zmq.LINGER, 0)
            if farm:
                self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_FARM_FRAME_BYTES)
                self.socket.setsockopt(zmq.RCVHWM, _FARM_RECEIVE_QUEUE)
                keep_alive(self.socket)
            if keys is not None:
                self._authenticator = secure_server(self.context, self.socket, keys, self._admits, wait=_ADMISSION_WAIT)
            self.socket.bind(endpoint)
            self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if advertise is not None:
                self.endpoint = f"tcp://{advertise}:{self.endpoint.rsplit(':', 1)[1]}"
            self.poller = zmq.Poller()
            self.poller.register(self.socket, zmq.POLLIN)
        except BaseException:  # a port taken, an address that does not parse: free what was made
            if self._authenticator is not None:
                self._authenticator.stop()
            self.context.destroy(linger=0)
            raise
        self.liveness = FarmLiveness(self.socket)

    def admit(self, key: str) -> None:
        """Lets a worker with this Curve public key (z85) connect: one leased to this trainer."""
        with self._admission:
            self._admitted.add(key.encode())
        if self._authenticator is not None:
            self._authenticator.wake()  # a worker may be connecting already: its key is waiting

    def _admits(self, key: bytes) -> bool:
        # Runs in the ZAP handler's thread, and must not block: a leased worker may connect before
        # this trainer has read the lease that names it (the broker sends JOIN first), and the
        # handler keeps its key waiting, without holding up others, until `admit` wakes it.
        with self._admission:
            return key in self._admitted

    def add(self, worker: WorkerHandle) -> None:
        """Routes requests to `worker`: on the socket unless it has a route (inline) already."""
        if worker.route is None:
            worker.route = SocketRoute(self.socket, worker.identity, self.trusted)
        self.workers[worker.identity] = worker
        if worker.identity in self._early:
            worker.route.keep(self._early.pop(worker.identity))
        if worker.process is not None:
            self._sentinels[worker.process.sentinel] = worker
            self.poller.register(worker.process.sentinel, zmq.POLLIN)

    def use_channel(self, worker: WorkerHandle, channels: TrainerChannels) -> None:
        """Routes requests to `worker` through its mailboxes in `channels`, which it attached to."""
        self.channels = channels
        worker.route = ChannelRoute(channels, worker, worker.route)

    def new_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    def send(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """Sends one request to `worker`; raises WorkerDiedError if it is known to be gone."""
        if worker.dead:
            raise self._died(worker)
        try:
            worker.route.send(message)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            if worker.process is not None:
                worker.process.join(0.5)
            exited = worker.process is not None and worker.process.exitcode is not None
            worker.dead = worker.dead or (exit_reason(worker.process) if exited else DISCONNECTED)
            raise self._died(worker) from None

    def _died(self, worker: WorkerHandle) -> WorkerDiedError:
        return WorkerDiedError(f"envfarm {worker.describe()} {worker.dead}; its envs are lost", worker)

    def ask(
        self,
        kind: str,
        requests: dict[WorkerHandle, dict[str, Any]],
        timeout: float | None,
        lost: list[WorkerHandle] | None = None,
    ) -> Replies:
        """Sends each worker its request of `kind` (the fields given), then waits for every reply.
        Given a `lost` list, a worker found gone (when sent to, or while waited for) is put there
        instead of raising WorkerDiedError."""
        rid, expected = self.new_rid(), {}
        for worker, fields in requests.items():
            try:
                self.send(worker, m.make(kind, rid, **fields))
            except WorkerDiedError:
                if lost is None:
                    raise
                lost.append(worker)
                continue
            expected[worker] = rid
        return self.collect(expected, timeout, wait_all=True, lost=lost)

    def gather(self, rid: int, workers: list[WorkerHandle], timeout: float | None) -> Replies:
        """Waits for the reply with id `rid` from each of `workers`.

        Raises multiprocessing.TimeoutError after `timeout` seconds (None: no limit), and
        WorkerDiedError as soon as one of them is gone.
        """
        return self.collect({worker: rid for worker in workers}, timeout, wait_all=True)

    def collect(
        self, expected: Pending, timeout: float | None, wait_all: bool, lost: list[WorkerHandle] | None = None
    ) -> Replies:
        """Waits for each worker's reply to the request id `expected[worker]`: for all of them, or
        (wait_all=False) for at least one. Any other reply is stale and dropped.

        A worker that is gone raises WorkerDiedError, or, given a `lost` list, is put there and
        no longer waited for.
        """
        pending = dict(expected)
        replies: Replies = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self._collect_once(pending, replies, deadline, timeout, wait_all):
                    return replies
            except WorkerDiedError as e:
                if lost is None or e.worker not in pending:
                    raise
                lost.append(e.worker)
                del pending[e.worker]
                if not pending:
                    return replies

    def _collect_once(
        self, pending: Pending, replies: Replies, deadline: float | None, timeout: float | None, wait_all: bool
    ) -> bool:
        """One look at every source of replies, and one wait; True when the collection is complete."""
        for worker in pending:
            if worker.dead:
                raise self._died(worker)
        self._take_from_routes(pending, replies)
        if self.liveness.dead_after is not None and time.monotonic() >= self._next_drain:
            # Replies on channels never wake the socket: heartbeats, and whatever strangers send to
            # this port, are read (and let go) here, so they cannot pile up in it.
            self._next_drain = time.monotonic() + LOOK_EVERY
            self._drain(pending, replies)
        if not pending or (replies and not wait_all):
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            self._dispatch(self.poller.poll(0), pending, replies)  # a last look at what already arrived
            if not pending or (replies and not wait_all):
                return True
            waiting = ", ".join(worker.describe() for worker in sorted(pending, key=lambda w: w.index))
            raise multiprocessing.TimeoutError(f"no reply within {timeout} s from {waiting}")
        if self.liveness.dead_after is not None:  # wake up to notice a farm worker that has gone silent
            remaining = LOOK_EVERY if remaining is None else min(remaining, LOOK_EVERY)
        on_channel = [worker for worker in pending if type(worker.route) is ChannelRoute]
        if on_channel:
            # Replies ring a futex; the socket (a reply too large for its slot) and the worker
            # processes are looked at between short sleeps.
            rang = self.channels.wait(
                [worker.index for worker in on_channel],
                _CHANNEL_SLICE if remaining is None else min(remaining, _CHANNEL_SLICE),
            )
            # A poll is a syscall: skipped when a channel rang for a wait on channels only, unless a
            # reply comes on the socket. A process's exit is seen within a slice all the same.
            on_socket = len(on_channel) < len(pending) or any(worker.route.reply_on_socket for worker in on_channel)
            events = self.poller.poll(0) if on_socket or not rang else []
        else:
            events = self.poller.poll(None if remaining is None else int(remaining * 1000) + 1)
        self._dispatch(events, pending, replies)
        self._check_liveness(pending, replies)
        return False

    def _dispatch(self, events: list[tuple[Any, int]], pending: Pending, replies: Replies) -> None:
        for fd, _ in events:
            if fd is self.socket:
                self._drain(pending, replies)
            else:
                self._on_exit(fd, pending, replies)

    def patience(self, seconds: float) -> AbstractContextManager[None]:
        """Allows farm workers `seconds` of silence instead of dead_after (client/liveness.py)."""
        return self.liveness.patience(seconds)

    def _check_liveness(self, pending: Pending, replies: Replies) -> None:
        """Fails the wait for a farm worker that looks lost (client/liveness.py). A reply that
        already arrived is life: it is looked for before any verdict."""
        if not self.liveness.look_due():
            return
        now = time.monotonic()
        for worker in [worker for worker in pending if worker.remote]:
            verdict = self.liveness.verdict(worker, pending[worker])
            if verdict:
                self._last_look(pending, replies)
                if worker in pending and not self.liveness.heard_lately(worker, now):
                    worker.dead = verdict
                    raise self._died(worker)

    def _last_look(self, pending: Pending, replies: Replies) -> None:
        """Takes every reply that has arrived by now, before a worker is declared lost."""
        self._take_from_routes(pending, replies)
        self._drain(pending, replies)

    def _take_from_routes(self, pending: Pending, replies: Replies) -> None:
        """Takes the replies that came by the workers' own routes (channels, inline, kept HELLOs)."""
        for worker in list(pending):
            try:
                taken = worker.route.take()
            except ProtocolError as e:
                self._malformed(worker, e, pending)
                continue
            if taken is not None:
                self._accept(worker, taken[0], pending, replies, checked=taken[1])

    def _drain(self, pending: Pending, replies: Replies) -> None:
        """Reads what the socket holds; returns early once nothing is pending, or after a budget of
        messages, so that a peer flooding the port cannot keep the wait from seeing it is complete."""
        for _ in range(_DRAIN_BUDGET):
            try:
                identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            sender = identity.bytes
            worker = self.workers.get(sender)
            if worker is None and sender.endswith(m.HEARTBEAT_SUFFIX) and len(frames) == 1:
                self._heartbeat(sender[: -len(m.HEARTBEAT_SUFFIX)], frames[0].bytes, pending, replies)
                continue
            if worker is not None and worker.dead and worker.remote:
                worker = None  # given up for lost: nothing it says counts (a HELLO: it was leased to this trainer anew)
            if worker is None:
                self._keep_early_hello(sender, frames)
                continue
            try:
                message = unpack([f.buffer for f in frames], allow_pickle=self.trusted)
            except ProtocolError as e:
                self._malformed(worker, e, pending)
                continue
            self._accept(worker, message, pending, replies)
            if not pending:
                return

    def _heartbeat(self, identity: bytes, frame: bytes, pending: Pending, replies: Replies) -> None:
        """A farm worker's heartbeat: life, or proof that a request sent to it was lost. Any reply
        that came first counts."""
        worker = self.workers.get(identity)
        if worker is None or not worker.remote:
            return
        verdict = self.liveness.heartbeat(worker, frame)
        if verdict:
            self._last_look(pending, replies)
            worker.dead = verdict
            if worker in pending:
                raise self._died(worker)

    def _keep_early_hello(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        """A farm worker may say HELLO before this trainer has read the lease that names it. What
        is kept is bounded in count and size: the port faces the network."""
        if not self.farm or not identity.startswith(m.WORKER_PREFIX) or len(self._early) >= _MAX_EARLY:
            return
        if len(frames) != 1 or len(frames[0]) > _MAX_EARLY_BYTES:
            return
        try:
            message = unpack([frames[0].buffer])
        except ProtocolError:
            return
        if message.get("kind") == m.HELLO:
            self._early[identity] = message

    def _malformed(self, worker: WorkerHandle, error: ProtocolError, pending: Pending) -> None:
        worker.dead = f"sent a malformed message ({error})"
        if worker in pending:
            raise self._died(worker) from None

    def _accept(
        self, worker: WorkerHandle, message: dict[str, Any], pending: Pending, replies: Replies, checked: bool = False
    ) -> None:
        if not checked:
            try:
                m.check(message)
            except ProtocolError as e:
                self._malformed(worker, e, pending)
                return
        worker.last_heard = time.monotonic()  # any reply is life, a late one too
        if message["kind"] == m.ERROR and message["rid"] == 0 and pending.get(worker, 0) != 0:
            # It could not read the request it was sent: that request failed.
            message = {**message, "rid": pending[worker]}
        if pending.get(worker) != message["rid"]:  # a late reply to an abandoned request
            return
        if message["kind"] == m.HELLO:
            worker.pid, worker.host, worker.connected = message["pid"], message["host"], True
            worker.connection = message.get("link") if type(message.get("link")) is int else None
        replies[worker] = message
        del pending[worker]

    def _on_exit(self, sentinel: int, pending: Pending, replies: Replies) -> None:
        """A local worker process has exited: fail the wait if its reply is still owed."""
        worker = self._sentinels.pop(sentinel)
        self.poller.unregister(sentinel)
        worker.process.join(0.5)
        worker.dead = exit_reason(worker.process)
        if worker in pending:  # its last reply may still be in flight
            self._take_from_routes(pending, replies)
            if self.socket.poll(100):
                self._drain(pending, replies)
        if worker in pending:
            raise self._died(worker)

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        self.context.destroy(linger=0)
