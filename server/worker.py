"""A worker process: hosts K envs and serves one request at a time from its trainer.

    worker DEALER --connect--> the trainer's ROUTER (then the same-host channel, once attached)

It says HELLO, builds its envs on CREATE, reports their spaces (the trainer builds no dummy env),
attaches to the trainer's shared memory on ATTACH when the probe succeeds, then answers RESET,
STEP, CALL, SET_ATTR and CLOSE. A malformed message gets an ERROR reply and the worker goes on.
A farm worker (server/farm_worker.py) serves the same way, on a lease from the broker.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

import zmq
from threadpoolctl import threadpool_limits

from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.server.request_handler import RequestHandler
from envfarm.transport import channel as shm_channel
from envfarm.transport.curve import KeyPair, secure_client
from envfarm.transport.sockets import keep_alive

_PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%(asctime)s %(name)s %(process)d %(levelname)s %(message)s"
RESEND_AFTER = (
    2 * m.HEARTBEAT_INTERVAL
)  # seconds a reply may be on its way before a probe asking for it has it sent again


def die_with_parent(parent_pid: int, is_parent: bool = True) -> None:
    """Makes this process die when the process `parent_pid` dies, even mid-step in a hung env.

    Its parent: the kernel kills it (PR_SET_PDEATHSIG). Otherwise (multiprocessing's fork server
    is the parent of a forkserver worker) a thread waits on a pidfd of that process.
    """
    if not is_parent:
        try:
            pidfd = os.pidfd_open(parent_pid)
        except ProcessLookupError:  # the trainer died before this worker started
            os._exit(1)
        except (OSError, AttributeError):  # no pidfd here: the trainer's close() and daemon flag remain
            return
        threading.Thread(target=_exit_when_readable, args=(pidfd,), name="envfarm-trainer-watch", daemon=True).start()
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the trainer's close() and daemon flag remain
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _exit_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    os._exit(1)


def limit_threads() -> None:
    """Numeric libraries in a worker process use one thread each (ENVFARM_WORKER_THREADS=N sets
    another number, 0 leaves them alone). A worker per CPU is already all the parallelism there
    is: a BLAS or OpenMP pool per worker, whose threads busy-wait between calls, takes the cores
    that the other envs and the trainer's policy need."""
    threads = int(os.environ.get("ENVFARM_WORKER_THREADS") or 1)
    if threads <= 0:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)  # for libraries loaded from now on (an env's own imports)
    threadpool_limits(threads)  # for those loaded already
    set_torch_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)
    if set_torch_threads is not None:
        set_torch_threads(threads)


def run_local_worker(endpoint: str, identity: bytes, parent_pid: int, is_parent: bool = True) -> None:
    """Entry point of a worker process started by a trainer on this host (a trusted link)."""
    # Ctrl-C reaches the whole process group; the trainer alone should see it, once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid, is_parent)
    limit_threads()
    worker = Worker(identity, trusted=True)
    worker.connect(endpoint)
    worker.serve()


class Worker:
    """Serves the requests of one trainer, on a DEALER socket or the channel it attached, until CLOSE."""

    def __init__(self, identity: bytes, *, trusted: bool, allow: Sequence[str] | None = None):
        self.identity = identity
        self.trusted = trusted
        self.allow = allow
        self.context = zmq.Context()
        self.data: zmq.Socket | None = None
        self.requests_read = 0  # from the socket to the trainer: a farm worker's heartbeats say it
        self.probe_seen = 0  # the count in the last probe the trainer sent on that socket
        self.last_reply: tuple[int, list, float] | None = (
            None  # (rid, frames, when sent) of the last reply sent on that socket
        )
        self.link = 0
        self.handler = RequestHandler(trusted=trusted, allow=allow)
        self.channel: shm_channel.WorkerEnd | None = None
        self.hello = m.make(m.HELLO, 0, version=m.PROTOCOL_VERSION, pid=os.getpid(), host=socket.gethostname())

    def serve(self) -> None:
        """Serves the trainer connected to until it says CLOSE."""
        try:
            while self.data is not None:
                self.serve_one(self.receive())
        finally:
            self.context.destroy(linger=1000)

    def connect(self, endpoint: str, curve: tuple[KeyPair, bytes] | None = None) -> None:
        """Opens the socket to a trainer and says HELLO on it."""
        self.data = self.context.socket(zmq.DEALER)
        self.data.setsockopt(zmq.IDENTITY, self.identity)
        # No ZMTP heartbeats here (see transport/sockets.py): the trainer judges this link by the worker's own.
        self.data.setsockopt(zmq.LINGER, 1000)
        keep_alive(self.data)
        if curve is not None:
            secure_client(self.data, *curve)
        self.data.connect(endpoint)
        # probe_seen first: a heartbeat thread reads it first, so it never sees a probe newer than the requests
        self.probe_seen = self.requests_read = 0
        self.last_reply = None
        self.link = int.from_bytes(os.urandom(8), "little")  # this connection's token, in HELLO and heartbeats
        self.send({**self.hello, "link": self.link})

    def disconnect(self) -> None:
        """Ends the service of a trainer: its envs are closed, and the socket to it."""
        if self.handler.envs is not None and not self.handler.closed:
            self.handler.respond(m.make(m.CLOSE, 0))
        self.handler, self.channel = RequestHandler(trusted=self.trusted, allow=self.allow), None
        if self.data is not None:
            self.data.close(linger=1000)
            self.data = None

    def send(self, message: dict[str, Any]) -> None:
        if self.channel is not None and _all_in_shared_memory(message):
            self.channel.send([m.result_record(message["rid"])])
            return
        try:
            frames = pack(message, allow_pickle=self.trusted)
        except TypeError as e:
            frames = pack(m.make(m.ERROR, message["rid"], error=ErrorInfo.from_exception(e).to_data()))
        if self.channel is None or not self.channel.send(frames):
            self.data.send_multipart(frames, copy=False)
            # Kept until the next request: the arrays it views change only when that is served.
            self.last_reply = (message["rid"], frames, time.monotonic())

    def serve_one(self, message: dict[str, Any] | ProtocolError | None) -> None:
        """Answers one request (a malformed one with an ERROR); CLOSE ends the service."""
        if message is None:
            return
        if isinstance(message, ProtocolError):
            self.send(m.make(m.ERROR, 0, error=ErrorInfo.from_exception(message).to_data()))
            return
        self.send(self.handler.respond(message))
        if message.get("kind") == m.CREATE:
            limit_threads()  # building the envs may have loaded a library with a pool of its own
        if message.get("kind") == m.CLOSE:
            self.disconnect()
        elif self.channel is None and self.handler.channel is not None:
            self.channel = self.handler.channel  # ATTACHED went on the socket; the rest goes here

    def receive(self) -> dict[str, Any] | ProtocolError | None:
        """The next request from the trainer, or the ProtocolError that decoding it raised. Waits
        for it on the socket; on the channel, returns None after a short sleep without one (so the
        caller can look at its sockets too), or if the trainer replaced it while it was read."""
        if self.channel is None:
            return self.from_socket()
        seq = self.channel.wait()
        if seq is None:
            return self.from_socket() if self.data.poll(0) else None
        frames = self.channel.requests.read()
        if frames is None:  # too large for the slot: it came on the socket, unless the read was torn
            return self.from_socket() if self.channel.requests.seq.value == seq else None
        rid = m.read_step_record(frames)
        if rid is not None:
            message = self._step_of_record(rid)
            return message if self.channel.requests.seq.value == seq else None
        try:
            message = unpack(frames, allow_pickle=self.trusted)
        except ProtocolError as e:
            return e if self.channel.requests.seq.value == seq else None
        return message if self.channel.requests.seq.value == seq else None

    def _step_of_record(self, rid: int) -> dict[str, Any] | ProtocolError:
        """The STEP a step record stands for: all this worker's envs, actions in shared memory."""
        envs = self.handler.envs
        if envs is None or not envs.in_shared_memory or any(rows is None for rows in envs.action_rows):
            return ProtocolError(
                "a step record needs the trainer's batch buffer attached, with every action leaf in it"
            )
        return m.make(m.STEP, rid, envs=envs.env_ids, actions=[None] * len(envs.action_rows))

    def from_socket(self) -> dict[str, Any] | ProtocolError | None:
        frames = self.data.recv_multipart(copy=False)
        probe = m.read_trainer_probe(frames[0].bytes) if len(frames) == 1 else None
        if probe is not None:  # a farm trainer's probe: it came after every request counted in it
            requests_sent, awaited = probe
            self.probe_seen = max(self.probe_seen, requests_sent)
            rid, reply, sent_at = self.last_reply or (None, [], 0.0)
            # Answered, yet awaited long after: a reset lost it on the way back. Sent again, at
            # most once per RESEND_AFTER, so that a large reply merely slow to arrive is not multiplied.
            if rid == awaited and requests_sent == self.requests_read and time.monotonic() - sent_at > RESEND_AFTER:
                self.data.send_multipart(reply, copy=False)
                self.last_reply = (rid, reply, time.monotonic())
            return None
        self.last_reply = None
        self.requests_read += 1
        try:
            return unpack([frame.buffer for frame in frames], allow_pickle=self.trusted)
        except ProtocolError as e:
            return e


def _all_in_shared_memory(reply: dict[str, Any]) -> bool:
    """Whether a reply is a step's RESULT that says nothing the shared batch buffer does not hold."""
    return (
        reply["kind"] == m.RESULT
        and reply.get("rewards", 0) is None
        and all(leaf is None for leaf in reply["obs"])
        and reply["infos"] == {}
        and not reply["errors"]
    )


def __getattr__(name: str) -> Any:
    # envfarm/cli.py imports run_farm_workers from here; lazily, since farm_worker.py imports this module
    if name == "run_farm_workers":
        from envfarm.server.farm_worker import run_farm_workers

        return run_farm_workers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
