"""Shared-memory segments the trainer creates for its local workers.

Made with os.open and mmap rather than multiprocessing.shared_memory.SharedMemory, whose close()
fails (and whose finaliser prints a BufferError) while any numpy view of the segment is alive,
e.g. an observation a user kept with copy=False. The segment is registered with
multiprocessing's resource tracker, so it is unlinked even if the trainer is killed; close()
unlinks it at once, and the mapping itself goes away with its last view.
"""

from __future__ import annotations

import mmap
import os
import secrets
from multiprocessing import resource_tracker

SHM_DIR = "/dev/shm"


class Segment:
    """A new segment of `size` bytes in /dev/shm, mapped read-write."""

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
            os.ftruncate(fd, max(size, 1))
            self.buffer = mmap.mmap(fd, max(size, 1))
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, self.name))
            raise
        os.close(fd)
        resource_tracker.register("/" + self.name, "shared_memory")
        self.size = size

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
