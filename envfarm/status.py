"""`envfarm status`: what a broker knows of its farm."""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any

import zmq

from envfarm.protocol import messages as m
from envfarm.protocol.packing import pack, unpack
from envfarm.server.broker import FRESH_HEARTBEATS
from envfarm.transport.curve import load_key_pair, load_public_key, secure_client


def query(broker: str, curve: tuple[str, str] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The broker's STATUS reply; TimeoutError if it does not answer in `timeout` seconds."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, m.TRAINER_PREFIX + secrets.token_bytes(15))
    socket.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        secure_client(socket, load_key_pair(curve[0]), load_public_key(curve[1]))
    socket.connect(broker)
    try:
        socket.send_multipart([b"", *pack(m.make(m.STATUS, 1))])
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from the broker at {broker} within {timeout:g} s")
        _, *frames = socket.recv_multipart()
        return unpack(frames)
    finally:
        socket.close(linger=0)
        context.term()


def is_free(worker: dict[str, Any]) -> bool:
    """Whether the broker would lease this worker of its STATUS reply now: unleased, and heard from
    within FRESH_HEARTBEATS heartbeat intervals. A worker killed a moment ago stays listed until
    the broker strikes it off (after --dead-after, 5 s by default), but is not free after 2.5 s."""
    return not worker["leased_to"] and worker["silent_s"] <= FRESH_HEARTBEATS * m.HEARTBEAT_INTERVAL


def show_status(broker: str, curve: tuple[str, str] | None, as_json: bool) -> int:
    """Prints the farm: its workers, their slots and leases, and the env steps each serves per second."""
    try:
        status = query(broker, curve)
    except TimeoutError as e:
        print(f"envfarm status: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status))
        return 0
    workers = status["workers"]
    silent = sum(1 for w in workers if not w["leased_to"] and not is_free(w))
    print(
        f"{len(workers)} workers, {sum(w['slots'] for w in workers)} slots, "
        f"{sum(w['slots'] for w in workers if w['leased_to'])} leased to {status['trainers']} trainers, "
        f"{sum(w['slots'] for w in workers if is_free(w))} free, "
        + (f"{silent} silent (not leased out), " if silent else "")
        + f"{sum(w['steps_per_s'] for w in workers):.0f} steps/s"
    )
    for w in workers:
        lease = f"leased to {w['leased_to'][:8]}" if w["leased_to"] else "free" if is_free(w) else "silent"
        print(
            f"  {w['id'][:8]}  {w['host']:<20} pid {w['pid']:<7} {w['slots']} slots  {lease:<18} "
            f"{w['steps_per_s']:>9.1f} steps/s  heard {w['silent_s']} s ago"
        )
    return 0
