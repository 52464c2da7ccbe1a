"""The ZeroMQ socket options that the broker, the trainer's router and the workers set alike."""

from __future__ import annotations

import zmq


def keep_alive(socket: zmq.Socket) -> None:
    """TCP keepalive: an idle link (a long policy update) keeps its place in NATs and firewalls,
    and a dead host is found. Set before connect or bind: libzmq copies a socket's options into
    each connection as it makes it, so one set afterwards never applies."""
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)


def zmtp_heartbeats(socket: zmq.Socket) -> None:
    """ZMTP heartbeats: a dead host or a half-open TCP connection is noticed within seconds and
    the connection remade. Only for control links (broker): on a data link, remaking the
    connection after a short network cut would lose the request in flight."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    socket.setsockopt(zmq.HEARTBEAT_TTL, 3000)
