"""A worker process: hosts K envs behind a ZeroMQ DEALER socket and serves one request at a time.

    worker = DEALER --connect--> trainer's ROUTER (local mode) or a broker (farm mode)

It says HELLO, builds its envs on CREATE, reports their spaces (the trainer builds no dummy env),
attaches to the trainer's shared memory on ATTACH when the probe succeeds, then answers RESET,
STEP, CALL, SET_ATTR and CLOSE. A malformed message gets an ERROR reply and the worker goes on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from typing import Any, Sequence

import zmq

from envfarm import channel as shm_channel
from envfarm.curve import secure_client
from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.server.broker import set_tcp_heartbeats
from envfarm.server.requests import RequestHandler

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Makes the kernel kill this process when its parent dies, even mid-step in a hung env."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the trainer's close() and daemon flag remain
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def run_farm_worker(broker: str, slots: int, allow: Sequence[str] | None = None, curve: tuple[str, str] | None = None) -> None:
    """Entry point of `envfarm worker`: serves leases from the broker until killed.
    `curve`: (this worker's secret key file, the broker's public key file)."""
    Worker(broker, m.WORKER_PREFIX + os.urandom(15), trusted=False, slots=slots, allow=allow, curve=curve).serve()


def run_local_worker(endpoint: str, identity: bytes, parent_pid: int) -> None:
    """Entry point of a worker process started by a trainer on this host (a trusted link)."""
    # Ctrl-C reaches the whole process group; the trainer alone should see it, once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    Worker(endpoint, identity, trusted=True).serve()


class Worker:
    """Serves the requests that arrive on one DEALER socket (or the channel it attached) until CLOSE."""

    def __init__(
        self,
        endpoint: str,
        identity: bytes,
        *,
        trusted: bool,
        slots: int | None = None,
        allow: Sequence[str] | None = None,
        curve: tuple[str, str] | None = None,
    ):
        """`slots` makes this a farm worker: it registers with a broker, and CLOSE ends a lease
        (its envs are closed and it waits for the next trainer) rather than the process."""
        self.trusted = trusted
        self.slots = slots
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 1000)
        if slots is not None:
            set_tcp_heartbeats(self.socket)
        if curve is not None:
            secure_client(self.socket, *curve)
        self.socket.connect(endpoint)
        self.next_heartbeat = time.monotonic()
        self.allow = allow
        self.requests = RequestHandler(trusted=trusted, allow=allow)
        self.channel: shm_channel.WorkerEnd | None = None

    def send(self, message: dict[str, Any]) -> None:
        try:
            frames = pack(message, allow_pickle=self.trusted)
        except TypeError as e:
            frames = pack(m.make(m.ERROR, message["rid"], error=ErrorInfo.from_exception(e).to_data()))
        if self.channel is None or not self.channel.send(frames):
            self.socket.send_multipart(frames, copy=False)

    def receive(self) -> dict[str, Any] | None:
        """The next request; None if none came yet, or the trainer replaced it while it was being read."""
        if self.slots is not None and time.monotonic() >= self.next_heartbeat:  # a farm worker says it is alive
            self.socket.send(m.HEARTBEAT_FRAME)
            self.next_heartbeat = time.monotonic() + m.HEARTBEAT_INTERVAL
        if self.channel is None:
            if self.slots is not None and not self.socket.poll(int(m.HEARTBEAT_INTERVAL * 1000)):
                return None
            return unpack([f.buffer for f in self.socket.recv_multipart(copy=False)], allow_pickle=self.trusted)
        seq = self.channel.wait()
        if seq is None:  # nothing in the mailbox: a broker may be talking on the socket
            if not self.socket.poll(0):
                return None
            return unpack([f.buffer for f in self.socket.recv_multipart(copy=False)], allow_pickle=self.trusted)
        frames = self.channel.requests.read()
        if frames is None:  # too large for the slot: it came on the socket
            return unpack([f.buffer for f in self.socket.recv_multipart(copy=False)], allow_pickle=self.trusted)
        try:
            message = unpack(frames, allow_pickle=self.trusted)
        except ProtocolError:
            if self.channel.requests.seq.value != seq:
                return None
            raise
        return message if self.channel.requests.seq.value == seq else None

    def serve(self) -> None:
        hello = m.make(m.HELLO, 0, version=m.PROTOCOL_VERSION, pid=os.getpid(), host=socket.gethostname())
        if self.slots is not None:
            hello["slots"] = self.slots
        self.send(hello)
        # A farm worker whose lease ends (or that the broker does not know: a restarted broker, or
        # one that declared it lost) is sent CLOSE, and registers again.
        try:
            while True:
                try:
                    message = self.receive()
                except ProtocolError as exc:
                    self.send(m.make(m.ERROR, 0, error=ErrorInfo.from_exception(exc).to_data()))
                    continue
                if message is None:
                    continue
                self.send(self.requests.respond(message))
                if message.get("kind") == m.CLOSE:
                    if self.slots is None:
                        return
                    self.requests, self.channel = RequestHandler(trusted=self.trusted, allow=self.allow), None
                    self.send(hello)
                if self.channel is None and self.requests.channel is not None:
                    self.channel = self.requests.channel  # ATTACHED went on the socket; the rest goes here
        finally:
            self.socket.close(linger=1000)
            self.context.term()
