"""A farm worker process: registers with a broker and serves the trainers it is leased to.

    worker DEALER --connect--> broker (register, heartbeats, JOIN and CLOSE of leases)
    worker DEALER --connect--> the leased trainer's ROUTER (the data path, served as server/worker.py does)

Its broker's reachability, followed on the control socket's monitor, decides its health: an idle
worker out of the broker's reach for `broker_grace` seconds stops touching its alive file.
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

import zmq
from zmq.utils import monitor as zmq_monitor

from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.server.worker import LOG_FORMAT, Worker, die_with_parent, limit_threads
from envfarm.transport.curve import KeyPair, load_key_pair, load_public_key, secure_client
from envfarm.transport.sockets import zmtp_heartbeats

log = logging.getLogger("envfarm.worker")
BROKER_GRACE = 10.0  # seconds out of the broker's reach before an idle farm worker says it is unhealthy


def run_farm_workers(
    broker: str,
    slots: int,
    processes: int = 1,
    allow: Sequence[str] | None = None,
    curve: tuple[str, str] | None = None,
    alive_file: str | None = None,
    broker_grace: float = BROKER_GRACE,
) -> None:
    """Entry point of `envfarm worker`: serves leases from the broker until killed.

    One process: this one is the worker. More: each worker is a child process, and one that dies
    (an env that crashes its process) is replaced a second later, while the others serve on.
    `curve`: (this worker's secret key file, the broker's public key file). `alive_file` is
    touched at every heartbeat, for a container's health check (`envfarm alive FILE`), except
    by an idle worker that has not reached the broker for `broker_grace` seconds. With several
    processes, process i touches `alive_file`.i, so that one stuck process is seen.
    """
    keys = (load_key_pair(curve[0]), load_public_key(curve[1])) if curve is not None else None
    if processes == 1:
        _serve_farm(broker, slots, allow, keys, alive_file, broker_grace)
        return
    context = multiprocessing.get_context("spawn")

    def new_child(i: int) -> multiprocessing.Process:
        own_file = None if alive_file is None else f"{alive_file}.{i}"
        return context.Process(
            target=_serve_farm_child,
            args=(broker, slots, allow, keys, own_file, broker_grace, os.getpid()),
            daemon=True,
        )

    children = [new_child(i) for i in range(processes)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `docker stop`: the children go too (PDEATHSIG)
    try:
        for child in children:
            child.start()
        while True:
            multiprocessing.connection.wait([child.sentinel for child in children])
            for i, child in enumerate(children):
                if child.exitcode is not None:
                    log.warning("process %d exited with code %s; starting another", child.pid, child.exitcode)
                    time.sleep(1.0)  # no busy loop of crashes
                    children[i] = new_child(i)
                    children[i].start()
    finally:
        started = [child for child in children if child.pid is not None]
        for child in started:
            child.kill()
        for child in started:
            child.join(5)


def _serve_farm(
    broker: str,
    slots: int,
    allow: Sequence[str] | None,
    keys: tuple[KeyPair, bytes] | None,
    alive_file: str | None,
    broker_grace: float,
) -> None:
    limit_threads()
    FarmWorker(broker, m.WORKER_PREFIX + os.urandom(15), slots, allow, keys, alive_file, broker_grace).serve()


def _serve_farm_child(
    broker: str,
    slots: int,
    allow: Sequence[str] | None,
    keys: tuple[KeyPair, bytes] | None,
    alive_file: str | None,
    broker_grace: float,
    parent_pid: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the children
    logging.basicConfig(
        level=os.environ.get("ENVFARM_LOG_LEVEL", "INFO"), format=LOG_FORMAT
    )  # a spawned child starts unconfigured
    die_with_parent(parent_pid)
    _serve_farm(broker, slots, allow, keys, alive_file, broker_grace)


class FarmWorker(Worker):
    """A worker that registers with a broker and serves the trainers it is leased to, one at a time.

    Its HELLO to the broker, every HEARTBEAT_INTERVAL, is also its heartbeat and says which lease
    it serves. JOIN from the broker starts a lease: it connects to that trainer. CLOSE, from the
    trainer or from the broker, ends it: its envs are closed and it waits for the next lease.
    """

    def __init__(
        self,
        broker: str,
        identity: bytes,
        slots: int,
        allow: Sequence[str] | None,
        curve: tuple[KeyPair, bytes] | None,
        alive_file: str | None = None,
        broker_grace: float = BROKER_GRACE,
    ):
        super().__init__(identity, trusted=False, allow=allow)
        self.curve = curve
        self.alive_file = alive_file
        self.broker_grace = broker_grace
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, identity)
        self.control.setsockopt(zmq.LINGER, 0)
        zmtp_heartbeats(self.control)
        if curve is not None:
            secure_client(self.control, *curve)
        # The connection's events tell whether the broker can be reached: a worker that cannot reach
        # it gets no lease, and says so in its log and its health check.
        self.broker_events = self.control.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.broker_lost_at: float | None = time.monotonic()  # when the broker went out of reach; None while reached
        self.warned_of_broker = False
        self.control.connect(broker)
        # "steps": env steps served, for `envfarm status`
        self.registration = {
            **self.hello,
            "slots": slots,
            "allow": list(allow) if allow is not None else None,
            "lease": None,
            "lessee": None,
            "trainer_key": None,
            "steps": 0,
        }
        self.slots = slots
        self.broker = broker
        self.next_heartbeat = 0.0
        self.trainer_heartbeat: _TrainerHeartbeat | None = None

    def serve(self) -> None:
        """Serves leases until the process is killed."""
        try:
            while True:
                self.heartbeat()
                timeout = int(max(0.0, self.next_heartbeat - time.monotonic()) * 1000) + 1
                if self.data is None:
                    if self.control.poll(timeout):
                        self.from_broker()
                elif self.channel is None:
                    ready = dict(self.poller.poll(timeout))
                    if self.data in ready:
                        self.serve_one(self.from_socket())
                    if self.control in ready:
                        self.from_broker()
                else:
                    self.serve_one(self.receive())  # back within a short sleep when idle
                    if self.control.poll(0):
                        self.from_broker()
        finally:
            if self.trainer_heartbeat is not None:
                self.trainer_heartbeat.stop()
            self.control.disable_monitor()
            self.broker_events.close(linger=0)
            self.context.destroy(linger=1000)

    def heartbeat(self) -> None:
        """Tells the broker that this worker is alive (the trainer served hears it from a thread)."""
        if time.monotonic() < self.next_heartbeat:
            return
        self.next_heartbeat = time.monotonic() + m.HEARTBEAT_INTERVAL
        self.follow_broker_connection()
        # Idle and out of the broker's reach for long: unhealthy, so that an orchestrator restarts
        # (and a person sees) a worker that cannot serve. Serving a lease is health: the trainer's
        # link is direct, and the trainer-heartbeat thread touches the file then.
        if self.broker_lost_at is None or time.monotonic() - self.broker_lost_at < self.broker_grace:
            self.touch_alive_file()
        try:  # a broker that does not read (its queue is full) misses a heartbeat: it is the one to notice
            self.control.send_multipart(pack(self.registration), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def follow_broker_connection(self) -> None:
        """Reads the control connection's events; logs when the broker is lost and found again."""
        while self.broker_events.poll(0):
            event = zmq_monitor.recv_monitor_message(self.broker_events)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.broker_lost_at is not None:
                log.info("broker %s reached", self.broker)
                self.broker_lost_at = None
            elif event == zmq.EVENT_DISCONNECTED and self.broker_lost_at is None:
                log.warning("broker %s lost; reconnecting", self.broker)
                self.broker_lost_at = time.monotonic()
        if (
            self.broker_lost_at is not None
            and time.monotonic() - self.broker_lost_at >= self.broker_grace
            and not self.warned_of_broker
        ):
            log.error(
                "broker %s out of reach for %g s; this worker gets no lease until it is back (health: unhealthy)",
                self.broker,
                self.broker_grace,
            )
            self.warned_of_broker = True
        elif self.broker_lost_at is None:
            self.warned_of_broker = False

    def touch_alive_file(self) -> None:
        """For the container's health check (`envfarm alive`). While a lease is served, the
        trainer-heartbeat thread touches it too: a step longer than the check's window is no death."""
        if self.alive_file is not None:
            with open(self.alive_file, "a"):
                os.utime(self.alive_file)

    def connect(self, endpoint: str, curve: tuple[KeyPair, bytes] | None = None) -> None:
        super().connect(endpoint, curve)
        self.poller = zmq.Poller()
        self.poller.register(self.data, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        self.trainer_heartbeat = _TrainerHeartbeat(self, endpoint, curve)

    def disconnect(self) -> None:
        if self.data is not None:
            log.info("lease %s ended", self.registration["lease"])
        if self.trainer_heartbeat is not None:
            self.trainer_heartbeat.stop()
            self.trainer_heartbeat = None
        super().disconnect()
        self.registration["lease"] = self.registration["lessee"] = self.registration["trainer_key"] = None
        self.next_heartbeat = 0.0  # tell the broker at once

    def serve_one(self, message: dict[str, Any] | ProtocolError | None) -> None:
        envs = message.get("envs") if isinstance(message, dict) else None
        if (
            isinstance(message, dict)
            and message.get("kind") == m.CREATE
            and isinstance(envs, list)
            and len(envs) > self.slots
        ):
            refusal = ProtocolError(
                f"CREATE asks for {len(envs)} envs; this worker hosts at most {self.slots} (--slots)"
            )
            self.send(
                m.make(
                    m.ERROR,
                    message["rid"] if type(message.get("rid")) is int else 0,
                    error=ErrorInfo.from_exception(refusal).to_data(),
                )
            )
            return
        if isinstance(message, dict) and message.get("kind") == m.STEP and isinstance(envs, list):
            self.registration["steps"] += len(envs)
        super().serve_one(message)

    def from_broker(self) -> None:
        try:
            message = m.check(unpack(self.control.recv_multipart()))
        except ProtocolError:
            return  # only the broker reaches this socket, and it sends nothing malformed
        if message["kind"] == m.CLOSE:
            self.disconnect()
        elif message["kind"] == m.JOIN:
            self.disconnect()
            server_key = message["server_key"]
            curve = (self.curve[0], server_key.encode()) if self.curve is not None and server_key else None
            endpoint = reachable(message["endpoint"], self.broker)
            try:
                self.connect(endpoint, curve)
            except (zmq.ZMQError, ValueError) as e:  # an endpoint or key this worker cannot use: no lease
                log.warning("lease %s: cannot connect to its trainer at %s: %s", message["lease"], endpoint, e)
                self.disconnect()
                return
            log.info("lease %s: serving trainer %s at %s", message["lease"], message["trainer"].hex()[:12], endpoint)
            trainer_key = message.get("trainer_key")
            self.registration.update(
                lease=message["lease"],
                lessee=message["trainer"],
                trainer_key=trainer_key if isinstance(trainer_key, str) else None,
            )
            self.next_heartbeat = 0.0


def reachable(endpoint: str, broker: str) -> str:
    """The trainer's endpoint as this worker can reach it. A trainer that reaches the broker on
    loopback runs on the broker's host and listens on every interface; a worker on another host
    (one that reaches the broker by a routable address) finds it at the broker's address."""
    trainer_host, _, port = endpoint[len("tcp://") :].rpartition(":")
    broker_host = broker[len("tcp://") :].rpartition(":")[0] if broker.startswith("tcp://") else ""
    if (
        not endpoint.startswith("tcp://")
        or not broker_host
        or not _is_loopback(trainer_host)
        or _is_loopback(broker_host)
    ):
        return endpoint
    return f"tcp://{broker_host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host.strip("[]"))).is_loopback
    except (OSError, ValueError):  # a name that does not resolve here: not this host's loopback
        return False


class _TrainerHeartbeat(threading.Thread):
    """Tells the trainer a farm worker serves that the worker is alive, every HEARTBEAT_INTERVAL,
    from a socket of its own (identity + HEARTBEAT_SUFFIX), while the worker's thread steps envs:
    the trainer then judges silence, never the length of a step. A process that is frozen, killed
    or stuck in C code holding the GIL goes silent, as it should."""

    def __init__(self, worker: FarmWorker, endpoint: str, curve: tuple[KeyPair, bytes] | None):
        super().__init__(name="envfarm-trainer-heartbeat", daemon=True)
        self.worker, self.endpoint, self.curve = worker, endpoint, curve
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        socket_ = self.worker.context.socket(zmq.DEALER)
        socket_.setsockopt(zmq.IDENTITY, self.worker.identity + m.HEARTBEAT_SUFFIX)
        socket_.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None:
                secure_client(socket_, *self.curve)
            socket_.connect(self.endpoint)
            while True:
                while socket_.poll(0):  # the trainer's probes of this connection: nothing to answer
                    socket_.recv(zmq.NOBLOCK)
                self.worker.touch_alive_file()
                probe_seen = self.worker.probe_seen  # first: requests_read then is at least the count it carries
                try:  # a trainer that does not read (its queue is full) misses one: it is the one to notice
                    socket_.send(
                        m.worker_heartbeat(self.worker.link, self.worker.requests_read, probe_seen), zmq.NOBLOCK
                    )
                except zmq.Again:
                    pass
                if self._stopped.wait(m.HEARTBEAT_INTERVAL):
                    return
        except zmq.ZMQError:  # the context is being destroyed: the worker is going away
            pass
        finally:
            socket_.close(linger=0)

    def stop(self) -> None:
        self._stopped.set()
        self.join(2)
