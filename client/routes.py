"""Routes: how the trainer's requests reach one worker, and how its replies come back.

Each worker has one route, chosen once: on the trainer's ROUTER socket (a farm worker, or a
local one that cannot share memory), through its shared-memory channel (a local worker that
attached to one), or inline (served by a RequestHandler in the trainer's own process). The
router (client/router.py) sends through the route and takes from it the replies that do not
come on the socket; what comes on the socket the router reads itself, for every worker at once.
"""

from __future__ import annotations

from typing import Any

import zmq

from envfarm.protocol import messages as m
from envfarm.protocol.errors import ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm.transport.channel import TrainerChannels

Taken = tuple[dict[str, Any], bool]  # a reply, and whether it is known well-formed (made by envfarm's own code)


class Route:
    """A route whose replies all come on the socket, except one kept for it (an early HELLO)."""

    reply_on_socket = False  # a reply is on its way on the socket though the route has its own way
    sent_on_socket = 0  # requests sent on the socket: a farm worker's heartbeats say how many it read

    def __init__(self) -> None:
        self._kept: Taken | None = None

    def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def keep(self, message: dict[str, Any]) -> None:
        """Holds a reply that arrived before the router knew this worker, for the next `take`."""
        self._kept = (message, False)

    def take(self) -> Taken | None:
        """The reply that came by this route's own way since the last look, or None.

        Raises:
            ProtocolError: If that reply is malformed.
        """
        kept, self._kept = self._kept, None
        return kept


class SocketRoute(Route):
    """Messages on the trainer's ROUTER socket, addressed by the worker's routing identity."""

    def __init__(self, socket: zmq.Socket, identity: bytes, trusted: bool):
        super().__init__()
        self.socket, self.identity, self.trusted = socket, identity, trusted

    def send(self, message: dict[str, Any]) -> None:
        """Raises zmq.ZMQError (EHOSTUNREACH) if the socket has no connection to the worker."""
        self.send_frames(pack(message, allow_pickle=self.trusted))

    def send_frames(self, frames: list[Any]) -> None:
        self.socket.send_multipart([self.identity, *frames], copy=False)
        self.sent_on_socket += 1


class ChannelRoute(Route):
    """A same-host worker's pair of shared-memory mailboxes; a message too large for its slot goes
    on the socket instead (the worker says so for a reply, by a marker in its slot)."""

    def __init__(self, channels: TrainerChannels, worker: Any, socket: SocketRoute):
        super().__init__()
        self.channels, self.worker, self.socket = channels, worker, socket
        self.index = worker.index

    @property
    def sent_on_socket(self) -> int:
        return self.socket.sent_on_socket

    def send(self, message: dict[str, Any]) -> None:
        self.reply_on_socket = False
        if self.worker.shared_memory and _whole_step_in_shared_memory(self.worker, message):
            self.channels.send(self.index, [m.step_record(message["rid"])])  # a record says it all
            return
        frames = pack(message, allow_pickle=self.socket.trusted)
        if not self.channels.send(self.index, frames):
            self.socket.send_frames(frames)

    def take(self) -> Taken | None:
        kept = super().take()
        if kept is not None:
            return kept
        seq = self.channels.new_reply(self.index)
        if seq is None:
            return None
        mailbox = self.channels.replies[self.index]
        frames = mailbox.read()
        if frames is None:
            if mailbox.seq.value == seq:  # else a torn read: the newer reply is taken next time
                self.reply_on_socket = True
            return None
        record = m.read_result_record(frames)  # made by the worker's envfarm code, well-formed: nothing to check
        try:
            message = record or unpack(frames, allow_pickle=self.socket.trusted)
        except ProtocolError:
            if mailbox.seq.value == seq:
                raise
            return None
        if mailbox.seq.value != seq:  # overwritten while read: the newer one is taken next time
            return None
        return message, record is not None


class InlineRoute(Route):
    """A block of envs served by a RequestHandler in the trainer's own process: a request is
    answered when sent (after the other workers were sent theirs, so they step meanwhile)."""

    def __init__(self, handler: Any):
        super().__init__()
        self.handler = handler

    def send(self, message: dict[str, Any]) -> None:
        self.keep(self.handler.respond(message))

    def close(self) -> None:
        """Closes the envs, if the trainer has not: they live in this process."""
        if self.handler.envs is not None and not self.handler.closed:
            self.handler.respond({"kind": m.CLOSE, "rid": 0})


def _whole_step_in_shared_memory(worker: Any, message: dict[str, Any]) -> bool:
    """Whether a message is a STEP of all the worker's envs with every action leaf in the shared
    batch buffer: then a step record says it all."""
    return (
        message["kind"] == m.STEP
        and all(leaf is None for leaf in message["actions"])
        and (message["envs"] is worker.env_list or message["envs"] == worker.env_list)
    )
