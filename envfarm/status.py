"""`envfarm status`: what a broker knows of its farm."""

from __future__ import annotations

import json
import sys
from typing import Any

from envfarm.client.broker_link import query
from envfarm.protocol import messages as m
from envfarm.server.broker import FRESH_HEARTBEATS


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
