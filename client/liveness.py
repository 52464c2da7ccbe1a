"""How a farm trainer tells a lost farm worker from a slow one.

A farm worker is not the trainer's child: no process exit can be watched, so it is known alive
only by what it sends. Every worker heartbeats from a thread of its own, stepping or not, on a
connection of its own (its identity + HEARTBEAT_SUFFIX). Three kinds of evidence give a verdict:

- silence: nothing heard for `dead_after` seconds (the broker's setting, from the lease), or for
  the patience allowed while a worker builds its envs;
- a lost connection: both its data and its heartbeat connection are gone (a killed process loses
  both; a data connection being remade after a network reset is not a death);
- a lost request: its heartbeat says it read a probe that followed N requests on one connection,
  yet read fewer than N (one was lost with a connection the network reset).

The policy here gives the verdict; the router (client/router.py) takes any reply that has already
arrived before it acts on one, because a reply is life.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import zmq

from envfarm.client.worker_handle import WorkerHandle
from envfarm.protocol import messages as m
from envfarm.protocol.packing import pack

LOOK_EVERY = 0.25  # seconds between looks at the farm workers' heartbeats while waiting for them
DISCONNECTED = "lost its connection (killed, or its host went away)"


class FarmLiveness:
    """Judges the farm workers that reply on `socket` (the trainer's ROUTER)."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.dead_after: float | None = None  # set from the broker's lease: how long a worker may be silent
        self._patience: float | None = None
        self._next_look = 0.0

    @contextlib.contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        """Allows `seconds` of silence instead of dead_after: a worker building its envs sends no
        heartbeats, and building them may take longer than dead_after."""
        self._patience = seconds
        try:
            yield
        finally:
            self._patience = None

    def look_due(self) -> bool:
        """Whether it is time for the next look (every LOOK_EVERY seconds, once a lease set dead_after)."""
        now = time.monotonic()
        if self.dead_after is None or now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY
        return True

    def verdict(self, worker: WorkerHandle, awaited: int) -> str:
        """Why `worker`, awaited for request id `awaited`, looks lost; "" while it does not."""
        silence = time.monotonic() - worker.last_heard
        allowed = self._patience or self.dead_after
        if silence > allowed:
            return f"was silent for more than {allowed:g} s (killed, frozen, cut off, or stuck holding the GIL)"
        if worker.connected and silence > LOOK_EVERY:
            # A probe goes behind every request sent before it: the worker's heartbeat will say
            # whether one was lost. Gone only if its heartbeat connection is gone too.
            probe = m.trainer_probe(worker.route.sent_on_socket, awaited)
            if not self._reaches(worker.identity, probe) and not self._reaches(
                worker.identity + m.HEARTBEAT_SUFFIX, b""
            ):
                return DISCONNECTED
        return ""

    @staticmethod
    def heard_lately(worker: WorkerHandle, moment: float) -> bool:
        """Whether anything came from `worker` within LOOK_EVERY of `moment`, or after it: a
        verdict reached at `moment` is then void."""
        return moment - worker.last_heard <= LOOK_EVERY

    def heartbeat(self, worker: WorkerHandle, frame: bytes) -> str:
        """Reads a heartbeat of `worker`: life, or (returned) the verdict that a request was lost.

        Its counts are read only on the connection whose HELLO the trainer took: a worker leased
        to this trainer again may heartbeat before the trainer has read that lease. A worker given
        up for lost, yet alive, is told to leave the lease (on that connection only).
        """
        fields = m.read_worker_heartbeat(frame)
        if fields is None:
            return ""
        connection, requests_read, probe_seen = fields
        if worker.dead:
            if worker.connection is None or connection == worker.connection:
                self._send_quietly(worker.identity, m.make(m.CLOSE, 0))
            return ""
        worker.last_heard = time.monotonic()
        if connection != worker.connection or probe_seen <= requests_read or worker.lost_request:
            return ""
        # The mark keeps this worker's later heartbeats (read while the verdict is given) from
        # judging it again.
        worker.lost_request = True
        return "lost a request (its connection was reset on the way)"

    def _reaches(self, identity: bytes, frame: bytes) -> bool:
        """Sends one frame to a peer; False if the socket has no connection to it any more."""
        try:
            self.socket.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH
        return True

    def _send_quietly(self, identity: bytes, message: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([identity, *pack(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
