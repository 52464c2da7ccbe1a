"""Shared-memory segments: a trainer creates them, a worker attaches after proving it reached the same one.

The trainer writes a random nonce right after a segment's `size` bytes and names both in the
segment's descriptor. A worker that opens the segment and reads the same nonce shares the
trainer's memory (same host, same IPC namespace or a shared tmpfs); otherwise its messages and
observations travel on the socket.

Made with os.open and mmap rather than multiprocessing.shared_memory.SharedMemory, whose close()
fails (and whose finaliser prints a BufferError) while any numpy view of the segment is alive,
e.g. an observation a user kept with copy=False. The trainer's segment is registered with
multiprocessing's resource tracker, so it is unlinked even if the trainer is killed; close()
unlinks it at once, and the mapping itself goes away with its last view. A worker's mapping is
not registered: the tracker would unlink the trainer's segment when the worker exits (gh-82300).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from multiprocessing import resource_tracker
from typing import Any

SHM_DIR = "/dev/shm"
NONCE_BYTES = 16
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class Segment:
    """A new segment of `size` bytes in /dev/shm, mapped read-write, with its nonce after them."""

    def __init__(self, size: int):
        for _ in range(16):
            self.name = f"envfarm_{os.getpid()}_{secrets.token_hex(6)}"
            try:
                fd = os.open(os.path.join(SHM_DIR, self.name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError("could not find a free shared-memory segment name")
        try:
            os.ftruncate(fd, size + NONCE_BYTES)
            self.buffer = mmap.mmap(fd, size + NONCE_BYTES)
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, self.name))
            raise
        os.close(fd)
        resource_tracker.register("/" + self.name, "shared_memory")
        self.size = size
        self.nonce = os.urandom(NONCE_BYTES)
        self.buffer[size : size + NONCE_BYTES] = self.nonce

    def descriptor(self) -> dict[str, Any]:
        """What a worker needs to attach: the segment's name, size and nonce."""
        return {"name": self.name, "size": self.size, "nonce": self.nonce}

    def close(self) -> None:
        """Unlinks the segment; the mapping is released now if no view of it is left, else with the last one."""
        if self.buffer is None:
            return
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        resource_tracker.unregister("/" + self.name, "shared_memory")
        try:
            self.buffer.close()
        except BufferError:
            pass
        self.buffer = None


def attach(descriptor: dict[str, Any]) -> tuple[mmap.mmap | None, str]:
    """Maps the segment a descriptor names if its nonce matches; else (None, why not)."""
    name, nonce, size = descriptor.get("name"), descriptor.get("nonce"), descriptor.get("size")
    if not (
        isinstance(name, str) and _NAME.match(name) and isinstance(nonce, bytes) and isinstance(size, int) and size >= 0
    ):
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
