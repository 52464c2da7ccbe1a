"""Attaching to the trainer's shared memory, after proving that it is reachable.

The trainer names a segment in /dev/shm and a nonce it wrote right after `size` bytes. A worker
that opens the segment and reads the same nonce shares the trainer's memory (same host, same IPC
namespace or a shared tmpfs); otherwise its messages and observations travel on the socket.
Segments are opened with os.open and mmap rather than multiprocessing.shared_memory, whose
resource tracker would unlink them when this process exits (gh-82300): the trainer owns them.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def map_segment(descriptor: dict[str, Any]) -> tuple[mmap.mmap | None, str]:
    """Maps the segment a descriptor names if its nonce matches; else (None, why not)."""
    name, nonce, size = descriptor.get("name"), descriptor.get("nonce"), descriptor.get("size")
    if not (isinstance(name, str) and _NAME.match(name) and isinstance(nonce, bytes) and isinstance(size, int) and size >= 0):
        return None, "malformed shared-memory descriptor"
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except OSError as e:
        return None, f"cannot open the trainer's segment {name}: {e.strerror}"
    try:
        if os.fstat(fd).st_size < size + len(nonce):
            return None, f"segment {name} is smaller than announced"
        segment = mmap.mmap(fd, size + len(nonce))
    finally:
        os.close(fd)
    if segment[size : size + len(nonce)] != nonce:
        segment.close()
        return None, f"nonce mismatch on {name}: another host's or IPC namespace's segment of the same name"
    return segment, ""


def batch_rows(segment: mmap.mmap, layout: dict[str, Any], first_row: int, num_rows: int) -> dict[str, Any]:
    """Views of rows [first_row, first_row + num_rows) of every array of the trainer's batch buffer:
    {"obs": [view or None per leaf], "actions": [...], "rewards": view, "terminated": view, "truncated": view}."""

    def rows(region: Any) -> np.ndarray | None:
        if region is None:
            return None
        offset, dtype, shape = region
        return np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=segment, offset=offset)[first_row : first_row + num_rows]

    views: dict[str, Any] = {name: [rows(region) for region in layout[name]] for name in ("obs", "actions")}
    views.update({name: rows(layout[name]) for name in ("rewards", "terminated", "truncated")})
    return views
