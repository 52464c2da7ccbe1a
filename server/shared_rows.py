"""Attaching to a trainer's shared-memory batch buffer, after proving that it is reachable.

The trainer names a segment in /dev/shm and a nonce it wrote there. A worker that opens the
segment and reads the same nonce shares the trainer's memory (same host, same IPC namespace or a
shared tmpfs); otherwise its observations travel as frames. The segment is opened with os.open and
mmap rather than multiprocessing.shared_memory, whose resource tracker would unlink the segment
when this process exits (gh-82300): the trainer owns it.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def attach(descriptor: dict[str, Any], first_row: int, num_rows: int) -> tuple[list[np.ndarray | None] | None, str]:
    """Returns ((num_rows, ...) views per leaf, "") if the probe succeeds, else (None, why not)."""
    name, nonce, size = descriptor.get("name"), descriptor.get("nonce"), descriptor.get("size")
    if not (isinstance(name, str) and _NAME.match(name) and isinstance(nonce, bytes) and isinstance(size, int)):
        return None, "malformed shared-memory descriptor"
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except OSError as e:
        return None, f"cannot open the trainer's segment: {e.strerror}"
    try:
        if os.fstat(fd).st_size < size + len(nonce):
            return None, "segment is smaller than announced"
        buffer = mmap.mmap(fd, size + len(nonce))
    finally:
        os.close(fd)
    if buffer[size : size + len(nonce)] != nonce:
        buffer.close()
        return None, "nonce mismatch: a different segment of the same name (another host or IPC namespace)"
    rows: list[np.ndarray | None] = []
    for leaf in descriptor.get("layout", []):
        if leaf is None:
            rows.append(None)
            continue
        offset, dtype, shape = leaf
        whole = np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=buffer, offset=offset)
        rows.append(whole[first_row : first_row + num_rows])
    return rows, ""
