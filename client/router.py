"""The trainer's side of the data path: one ROUTER socket, fan-out of requests and gathering of replies.

Workers connect to the router: local ones over ipc, farm workers over tcp once a broker has
leased them to this trainer. Every request gets a fresh id; a reply whose id is not the one being
gathered is a late reply to an abandoned request and is dropped, never returned for the next
call. While it waits, the router watches each local worker process (its sentinel fd sits in the
same poll as the socket) and each farm worker's heartbeats, so a worker that dies, freezes or is
cut off is reported by name within a deadline instead of being waited for.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from typing import Any, Iterator

import zmq

from envfarm.client.broker_link import BrokerHeartbeat, connect_broker
from envfarm.client.errors import WorkerDiedError
from envfarm.client.worker_handle import WorkerHandle, exit_reason
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.transport.channel import TrainerChannels
from envfarm.transport.curve import KeyPair, secure_server
from envfarm.transport.sockets import keep_alive


def _whole_step_in_shared_memory(worker: WorkerHandle, message: dict[str, Any]) -> bool:
    """Whether a message is a STEP of all the worker's envs with every action leaf in the shared
    batch buffer: then a step record says it all."""
    return (
        message["kind"] == m.STEP
        and all(leaf is None for leaf in message["actions"])
        and (message["envs"] is worker.env_list or message["envs"] == worker.env_list)
    )


_CHANNEL_SLICE = 0.02  # seconds between looks at the socket and the processes while waiting on channels
_SILENCE_CHECK = 0.25  # seconds between looks at the farm workers' heartbeats while waiting
_MAX_EARLY = 1024  # early HELLOs kept, at most
_MAX_EARLY_BYTES = 1024  # a HELLO is a few dozen bytes: a larger one is not kept
_FARM_RECEIVE_QUEUE = 64  # messages queued per peer, at most: a worker has one reply in flight; a flooder waits
_DRAIN_BUDGET = 256  # messages read from the socket between two looks at what is complete
_ADMISSION_WAIT = 2.0  # seconds a connecting worker's key may wait for the lease that admits it
MAX_FARM_FRAME_BYTES = 1 << 30  # the largest frame a farm trainer accepts: a worker's block of observations fits
_DISCONNECTED = "lost its connection (killed, or its host went away)"


class Router:
    """Sends requests to workers by ownership and gathers their replies by request id."""

    def __init__(
        self,
        endpoint: str,
        *,
        trusted: bool,
        broker: str | None = None,
        advertise: str | None = None,
        curve: tuple[KeyPair, bytes] | None = None,
    ):
        """A ROUTER bound at `endpoint` that workers connect to. With `broker`, a farm trainer:
        a DEALER to the broker for leases (and a heartbeat thread), and workers reach the ROUTER
        at `advertise` (host) and its port. `curve`: (this trainer's keys, the broker's public
        key); the ROUTER then admits only the workers leased to it."""
        self.trusted = trusted
        self.workers: dict[bytes, WorkerHandle] = {}
        self._sentinels: dict[int, WorkerHandle] = {}
        self._next_rid = 0
        self.channels: TrainerChannels | None = None
        self._reply_on_socket = False  # a channel said a reply too large for its slot comes on the socket
        self._arrived: dict[WorkerHandle, dict[str, Any]] = {}  # replies that came by another way than the poll
        self._early: dict[bytes, dict[str, Any]] = {}  # HELLOs of farm workers that beat their LEASED reply here
        self._admitted: set[bytes] = set()  # with curve: the public keys of the workers leased to this trainer
        self._admission = threading.Lock()
        self.server_key = curve[0][0].decode() if broker is not None and curve is not None else None
        self.dead_after: float | None = None  # set by the broker's lease: how long a farm worker may be silent
        self._patience: float | None = None
        self._next_probe = self._next_drain = 0.0
        self.broker: zmq.Socket | None = None
        self._authenticator = None
        self.context = zmq.Context()
        try:
            self.socket = self.context.socket(zmq.ROUTER)
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer must fail, not vanish
            self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a farm worker that reconnects keeps its identity
            self.socket.setsockopt(zmq.LINGER, 0)
            if broker is not None:  # a port on the network: bound what a stranger can make it buffer
                self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_FARM_FRAME_BYTES)
                self.socket.setsockopt(zmq.RCVHWM, _FARM_RECEIVE_QUEUE)
                keep_alive(self.socket)
            if self.server_key is not None:
                self._authenticator = secure_server(
                    self.context, self.socket, curve[0], self._admits, wait=_ADMISSION_WAIT
                )
            self.socket.bind(endpoint)
            self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if advertise is not None:
                self.endpoint = f"tcp://{advertise}:{self.endpoint.rsplit(':', 1)[1]}"
            self.poller = zmq.Poller()
            self.poller.register(self.socket, zmq.POLLIN)
            if broker is not None:
                self.broker = connect_broker(self.context, broker, curve)
                self.poller.register(self.broker, zmq.POLLIN)
        except BaseException:  # a port taken, a broker address that does not parse: free what was made
            if self._authenticator is not None:
                self._authenticator.stop()
            self.context.destroy(linger=0)
            raise
        if broker is not None:
            self._heartbeat = BrokerHeartbeat(broker, self.broker.getsockopt(zmq.IDENTITY) + m.HEARTBEAT_SUFFIX, curve)

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
        self.workers[worker.identity] = worker
        if worker.identity in self._early:
            self._arrived[worker] = self._early.pop(worker.identity)
        if worker.process is not None:
            self._sentinels[worker.process.sentinel] = worker
            self.poller.register(worker.process.sentinel, zmq.POLLIN)

    def new_rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    def use_channels(self, channels: TrainerChannels) -> None:
        """Local workers that attach to `channels` exchange messages through it from now on."""
        self.channels = channels

    def send(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        if worker.dead:
            raise self._died(worker)
        if worker.inline is not None:  # served right here, now: the other workers were sent theirs first
            self._arrived[worker] = worker.inline.respond(message)
            return
        if worker.channel and worker.shared_memory and _whole_step_in_shared_memory(worker, message):
            self.channels.send(worker.index, [m.step_record(message["rid"])])
            return
        frames = pack(message, allow_pickle=self.trusted)
        if worker.channel and self.channels.send(worker.index, frames):
            return
        if worker.identity == b"":  # the broker
            try:
                self.broker.send_multipart([b"", *frames], copy=False)
            except zmq.Again:
                pass  # no connection to it: the reply's wait times out, saying why
            return
        try:
            self.socket.send_multipart([worker.identity, *frames], copy=False)
            worker.requests_sent += 1
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            if worker.process is not None:
                worker.process.join(0.5)
            exited = worker.process is not None and worker.process.exitcode is not None
            worker.dead = worker.dead or (exit_reason(worker.process) if exited else _DISCONNECTED)
            raise self._died(worker) from None

    def _died(self, worker: WorkerHandle) -> WorkerDiedError:
        return WorkerDiedError(f"envfarm {worker.describe()} {worker.dead}; its envs are lost", worker)

    def ask(
        self,
        kind: str,
        requests: dict[WorkerHandle, dict[str, Any]],
        timeout: float | None,
        lost: list[WorkerHandle] | None = None,
    ) -> dict[WorkerHandle, dict[str, Any]]:
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

    def gather(
        self, rid: int, workers: list[WorkerHandle], timeout: float | None
    ) -> dict[WorkerHandle, dict[str, Any]]:
        """Waits for the reply with id `rid` from each of `workers`.

        Raises multiprocessing.TimeoutError after `timeout` seconds (None: no limit), and
        WorkerDiedError as soon as one of them is gone.
        """
        return self.collect({worker: rid for worker in workers}, timeout, wait_all=True)

    def collect(
        self,
        expected: dict[WorkerHandle, int],
        timeout: float | None,
        wait_all: bool,
        lost: list[WorkerHandle] | None = None,
    ) -> dict[WorkerHandle, dict[str, Any]]:
        """Waits for each worker's reply to the request id `expected[worker]`: for all of them, or
        (wait_all=False) for at least one. Any other reply is stale and dropped.

        A worker that is gone raises WorkerDiedError, or, given a `lost` list, is put there and
        no longer waited for.
        """
        pending = dict(expected)
        replies: dict[WorkerHandle, dict[str, Any]] = {}
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
        self,
        pending: dict[WorkerHandle, int],
        replies: dict[WorkerHandle, dict[str, Any]],
        deadline: float | None,
        timeout: float | None,
        wait_all: bool,
    ) -> bool:
        """One look at every source of replies, and one wait; True when the collection is complete."""
        for worker in pending:
            if worker.dead:
                raise self._died(worker)
        for worker in [worker for worker in pending if worker in self._arrived]:
            self._accept(worker, self._arrived.pop(worker), pending, replies)
        self._collect_channels(pending, replies)
        if self.dead_after is not None and time.monotonic() >= self._next_drain:
            # Replies on channels never wake the socket: heartbeats, and whatever strangers send to
            # this port, are read (and let go) here, so they cannot pile up in it.
            self._next_drain = time.monotonic() + _SILENCE_CHECK
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
        if self.dead_after is not None:  # wake up to notice a farm worker that has gone silent
            remaining = _SILENCE_CHECK if remaining is None else min(remaining, _SILENCE_CHECK)
        on_channel = [worker.index for worker in pending if worker.channel]
        if on_channel:
            # Replies ring a futex; the socket (a reply too large for its slot) and the worker
            # processes are looked at between short sleeps.
            rang = self.channels.wait(
                on_channel, _CHANNEL_SLICE if remaining is None else min(remaining, _CHANNEL_SLICE)
            )
            # A poll is a syscall: skipped when a channel rang for a wait on channels only, unless a
            # reply comes on the socket. A process's exit is seen within a slice all the same.
            if rang and len(on_channel) == len(pending) and not self._reply_on_socket:
                events = []
            else:
                self._reply_on_socket = False
                events = self.poller.poll(0)
        else:
            events = self.poller.poll(None if remaining is None else int(remaining * 1000) + 1)
        self._dispatch(events, pending, replies)
        self._check_silence(pending, replies)
        return False

    def _dispatch(
        self,
        events: list[tuple[Any, int]],
        pending: dict[WorkerHandle, int],
        replies: dict[WorkerHandle, dict[str, Any]],
    ) -> None:
        for fd, _ in events:
            if fd is self.socket:
                self._drain(pending, replies)
            elif fd is self.broker:
                self._drain_broker(pending, replies)
            else:
                self._on_exit(fd, pending, replies)

    @contextlib.contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        """Allows farm workers `seconds` of silence instead of dead_after: a worker building its
        envs cannot send heartbeats, and building them may take longer than dead_after."""
        self._patience = seconds
        try:
            yield
        finally:
            self._patience = None

    def _check_silence(self, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]) -> None:
        """Fails the wait for a farm worker that is silent for dead_after (its heartbeats come from
        a thread of their own, stepping or not), or whose connection is gone (a killed process:
        its host closes the connection, and a probe finds no route). A reply that already arrived
        is life: it is looked for before any verdict."""
        now = time.monotonic()
        if self.dead_after is None or now < self._next_probe:
            return
        self._next_probe = now + _SILENCE_CHECK
        allowed = self._patience or self.dead_after
        for worker in [worker for worker in pending if worker.remote]:
            verdict = ""
            if now - worker.last_heard > allowed:
                verdict = f"was silent for more than {allowed:g} s (killed, frozen, cut off, or stuck holding the GIL)"
            elif worker.connected and now - worker.last_heard > _SILENCE_CHECK:
                # Behind every request sent before it: the worker's heartbeat says whether one was
                # lost. Gone only if its heartbeat connection is gone too: a killed process loses
                # both at once, while a data connection being remade after a reset is not a death.
                if not self._reaches(
                    worker.identity, m.trainer_probe(worker.requests_sent, pending[worker])
                ) and not self._reaches(worker.identity + m.HEARTBEAT_SUFFIX, b""):
                    verdict = _DISCONNECTED
            if verdict:
                self._last_look(pending, replies)
                if worker in pending and now - worker.last_heard > _SILENCE_CHECK:
                    worker.dead = verdict
                    raise self._died(worker)

    def _reaches(self, identity: bytes, frame: bytes) -> bool:
        """Sends one frame to a peer; False if the socket has no connection to it any more."""
        try:
            self.socket.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH
        return True

    def _last_look(self, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]) -> None:
        """Takes every reply that has arrived by now, before a worker is declared lost."""
        self._collect_channels(pending, replies)
        self._drain(pending, replies)

    def _collect_channels(self, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]) -> None:
        for worker in [worker for worker in pending if worker.channel]:
            seq = self.channels.new_reply(worker.index)
            if seq is None:
                continue
            mailbox = self.channels.replies[worker.index]
            frames = mailbox.read()
            if frames is None:
                self._reply_on_socket = True  # too large for the slot: it comes on the socket
                continue
            record = m.read_result_record(frames)  # made here, well-formed: nothing to check
            try:
                message = record or unpack(frames, allow_pickle=self.trusted)
            except ProtocolError as e:
                if mailbox.seq.value == seq:
                    self._malformed(worker, e, pending)
                continue
            if mailbox.seq.value == seq:  # else overwritten while read: the newer one is taken next time
                self._accept(worker, message, pending, replies, checked=record is not None)

    def _drain(self, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]) -> None:
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
                self._worker_heartbeat(sender[: -len(m.HEARTBEAT_SUFFIX)], frames[0].bytes, pending, replies)
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

    def _worker_heartbeat(
        self,
        identity: bytes,
        frame: bytes,
        pending: dict[WorkerHandle, int],
        replies: dict[WorkerHandle, dict[str, Any]],
    ) -> None:
        """A farm worker's heartbeat: life, and whether a request sent to it was lost on the way.

        Its counts are read only on the connection whose HELLO this trainer took (the same `link`):
        a worker leased to this trainer again may heartbeat before the trainer has read that lease.
        """
        worker = self.workers.get(identity)
        fields = m.read_worker_heartbeat(frame)
        if worker is None or not worker.remote or fields is None:
            return
        link, requests_read, probe_seen = fields
        if worker.dead:  # given up for lost, yet alive: it must leave this trainer's lease
            if worker.link is None or link == worker.link:
                self._send_quietly(identity, m.make(m.CLOSE, 0))
            return
        worker.last_heard = time.monotonic()
        if link != worker.link or probe_seen <= requests_read or worker.lost_request:
            return
        # It read a probe that followed `probe_seen` requests on the same connection, yet read
        # fewer: one was lost with a connection the network reset. Any reply that came first
        # counts; the mark keeps this worker's later heartbeats from judging it again meanwhile.
        worker.lost_request = True
        self._last_look(pending, replies)
        worker.dead = "lost a request (its connection was reset on the way)"
        if worker in pending:
            raise self._died(worker)

    def _keep_early_hello(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        """A farm worker may say HELLO before this trainer has read the lease that names it. What
        is kept is bounded in count and size: the port faces the network."""
        if self.broker is None or not identity.startswith(m.WORKER_PREFIX) or len(self._early) >= _MAX_EARLY:
            return
        if len(frames) != 1 or len(frames[0]) > _MAX_EARLY_BYTES:
            return
        try:
            message = unpack([frames[0].buffer])
        except ProtocolError:
            return
        if message.get("kind") == m.HELLO:
            self._early[identity] = message

    def _drain_broker(self, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]) -> None:
        broker = self.workers[b""]
        while True:
            try:
                _, *frames = self.broker.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message = unpack([f.buffer for f in frames])
            except ProtocolError as e:
                self._malformed(broker, e, pending)
                continue
            self._accept(broker, message, pending, replies)

    def _send_quietly(self, identity: bytes, message: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([identity, *pack(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _malformed(self, worker: WorkerHandle, error: ProtocolError, pending: dict[WorkerHandle, int]) -> None:
        worker.dead = f"sent a malformed message ({error})"
        if worker in pending:
            raise self._died(worker) from None

    def _accept(
        self,
        worker: WorkerHandle,
        message: dict[str, Any],
        pending: dict[WorkerHandle, int],
        replies: dict[WorkerHandle, dict[str, Any]],
        checked: bool = False,
    ) -> None:
        if not checked:
            try:
                m.check(message)
            except ProtocolError as e:
                self._malformed(worker, e, pending)
                return
        worker.last_heard = time.monotonic()  # any reply is life, a late one too
        if message["kind"] == m.ERROR and message["rid"] == 0 and worker in pending and pending[worker] != 0:
            message = {
                **message,
                "rid": pending[worker],
            }  # it could not read the request it was sent: that request failed
        if pending.get(worker) != message["rid"]:  # a late reply to an abandoned request
            return
        if message["kind"] == m.HELLO:
            worker.pid, worker.host, worker.connected = message["pid"], message["host"], True
            worker.link = message.get("link") if type(message.get("link")) is int else None
        replies[worker] = message
        del pending[worker]

    def _on_exit(
        self, sentinel: int, pending: dict[WorkerHandle, int], replies: dict[WorkerHandle, dict[str, Any]]
    ) -> None:
        """A local worker process has exited: fail the wait if its reply is still owed."""
        worker = self._sentinels.pop(sentinel)
        self.poller.unregister(sentinel)
        worker.process.join(0.5)
        worker.dead = exit_reason(worker.process)
        if worker in pending:  # its last reply may still be in flight
            self._collect_channels(pending, replies)
            if self.socket.poll(100):
                self._drain(pending, replies)
        if worker in pending:
            raise self._died(worker)

    def close(self) -> None:
        if self.broker is not None:  # best effort: give the lease back even if the trainer never said close()
            self._heartbeat.stop()
            try:
                self.broker.send_multipart([b"", *pack(m.make(m.RELEASE, self.new_rid()))], zmq.NOBLOCK)
                self.broker.close(linger=500)
            except zmq.ZMQError:
                pass
        if self._authenticator is not None:
            self._authenticator.stop()
        self.context.destroy(linger=0)
