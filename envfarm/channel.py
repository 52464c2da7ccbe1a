"""A same-host message channel: mailboxes in shared memory, signalled with futexes.

Why: on the 2-core machine this was tuned on, a ZeroMQ round trip between two processes costs
about 165 us (each hop wakes libzmq's I/O thread, then the receiving thread), a raw pipe 78 us,
and a futex round trip 3 us when the peer is spinning and 88 us when it sleeps (see
docs/benchmarks.md, "Same-host signal"). A vector-env step of 16 CartPole envs costs about 130 us
in a plain loop, so on one host the ZeroMQ hop alone would lose to it. ZeroMQ stays the transport
for the handshake and for every worker on another host; this channel carries the same protocol
messages (the same frames) between a trainer and its local workers once both have proved, by a
nonce, that they share the segment.

Each worker has two single-slot mailboxes: requests (trainer -> worker) and replies. A mailbox is
a seqlock: the writer makes `seq` odd, writes, makes it even; a reader that sees `seq` change
while it reads reads again. A slot holds the latest message only, which is enough because the
trainer sends a new request only after the previous reply arrived or was abandoned (a timed-out
request may then never run). A message larger than its slot travels on the ZeroMQ socket, and the
slot carries a zero-frame marker saying so. Replies also ring one shared doorbell word, so the
trainer sleeps on one futex for all its workers; each worker rings with values of its own, so two
rings never look like one.

Linux on x86-64 only (the futex syscall number and x86's store ordering are relied on); elsewhere
`available()` is False and everything travels on ZeroMQ.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
import time
from typing import Any, Sequence

_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
# A mailbox: seq (int32) at 0, its reader's "asleep" flag (int32) at 4, frame count (uint32) at 8,
# frame sizes (uint64) from 16, then the frames. The segment starts with the doorbell (int32) at 0
# and the trainer's "asleep" flag at 4.
_ASLEEP, _COUNT, _SIZES = 4, 8, 16
# A writer wakes its reader only if the reader said it sleeps. Python has no memory fence, so on
# rare interleavings the flag is read stale and the wake is missed; sleeps are therefore short.
_SLEEP_SLICE = 0.005
_ALIGN = 16


def available() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if available() else None


def futex_wait(word: ctypes.c_int32, expected: int, timeout: float) -> None:
    """Sleeps while `word` holds `expected`, at most `timeout` seconds (spurious returns are fine)."""
    spec = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.byref(word), _FUTEX_WAIT, expected, ctypes.byref(spec), None, 0)


def futex_wake(word: ctypes.c_int32) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.byref(word), _FUTEX_WAKE, 1 << 30, None, None, 0)


class Mailbox:
    """One message slot at `offset` in `buffer`, `capacity` bytes including its header."""

    def __init__(self, buffer: memoryview, offset: int, capacity: int):
        self.seq = ctypes.c_int32.from_buffer(buffer, offset)
        self.asleep = ctypes.c_int32.from_buffer(buffer, offset + _ASLEEP)
        self.buffer = buffer
        self.offset = offset
        self.capacity = capacity

    def write(self, frames: Sequence[bytes | memoryview]) -> bool:
        """Replaces the slot's message; False (and the zero-frame marker) if it does not fit."""
        sizes = [memoryview(frame).nbytes for frame in frames]
        start = self.offset + _aligned(_SIZES + 8 * len(sizes))
        fits = start + sum(_aligned(size) for size in sizes) <= self.offset + self.capacity
        if not fits:
            sizes = []
        seq = self.seq.value
        self.seq.value = seq + 1
        struct.pack_into("<I", self.buffer, self.offset + _COUNT, len(sizes))
        struct.pack_into(f"<{len(sizes)}Q", self.buffer, self.offset + _SIZES, *sizes)
        position = start
        for frame, size in zip(frames if fits else (), sizes):
            self.buffer[position : position + size] = memoryview(frame).cast("B")
            position += _aligned(size)
        self.seq.value = seq + 2
        return fits

    def read(self) -> list[memoryview] | None:
        """The message in the slot as views (valid until the next write), or None for the marker.

        Check `seq` again after decoding the views: if the writer overwrote the slot meanwhile,
        the decoded message is torn and must be read again.
        """
        (count,) = struct.unpack_from("<I", self.buffer, self.offset + _COUNT)
        if count == 0:
            return None
        start = self.offset + _aligned(_SIZES + 8 * count)
        if start > self.offset + self.capacity:
            return []  # torn
        sizes = struct.unpack_from(f"<{count}Q", self.buffer, self.offset + _SIZES)
        frames, position = [], start
        for size in sizes:
            end = position + size
            if end > self.offset + self.capacity:
                return []  # torn
            frames.append(self.buffer[position:end])
            position += _aligned(size)
        return frames


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


NONCE_BYTES = 16


class TrainerChannels:
    """The trainer's side: one shared buffer holding every local worker's pair of mailboxes.

    `segment` is a shared-memory segment of at least `size(...)` bytes, with `.name` and a
    writable `.buffer`; the trainer creates and unlinks it.
    """

    @staticmethod
    def size(num_workers: int, request_capacity: int, reply_capacity: int) -> int:
        return _layout(num_workers, request_capacity, reply_capacity)[1] + NONCE_BYTES

    def __init__(self, segment: Any, num_workers: int, request_capacity: int, reply_capacity: int, spin_seconds: float):
        slots, self.size = _layout(num_workers, request_capacity, reply_capacity)
        self.segment = segment
        buffer = memoryview(segment.buffer)
        self.nonce = os.urandom(NONCE_BYTES)
        buffer[self.size : self.size + NONCE_BYTES] = self.nonce
        self.slots = slots
        self.requests = [Mailbox(buffer, offset, request_capacity) for offset, _ in slots]
        self.replies = [Mailbox(buffer, offset, reply_capacity) for _, offset in slots]
        self.read_seq = [0] * num_workers
        self.doorbell = ctypes.c_int32.from_buffer(buffer, 0)
        self.asleep = ctypes.c_int32.from_buffer(buffer, _ASLEEP)
        self.spin_seconds = spin_seconds

    def descriptor(self, worker: int) -> dict:
        request, reply = self.slots[worker]
        return {
            "name": self.segment.name, "size": self.size, "nonce": self.nonce, "worker": worker,
            "request": [request, self.requests[worker].capacity], "reply": [reply, self.replies[worker].capacity],
        }

    def send(self, worker: int, frames: Sequence[bytes | memoryview]) -> bool:
        mailbox = self.requests[worker]
        fits = mailbox.write(frames)
        if mailbox.asleep.value:
            futex_wake(mailbox.seq)
        return fits

    def new_reply(self, worker: int) -> int | None:
        """The seq of a reply not seen yet from this worker, or None."""
        seq = self.replies[worker].seq.value
        if seq == self.read_seq[worker] or seq & 1:
            return None
        self.read_seq[worker] = seq
        return seq

    def wait(self, pending: Sequence[int], timeout: float) -> None:
        """Returns when a reply may have come from one of `pending`, or after `timeout` seconds."""
        ring = self.doorbell.value
        deadline = time.perf_counter() + min(self.spin_seconds, timeout)
        while time.perf_counter() < deadline:
            if any(self.replies[w].seq.value != self.read_seq[w] for w in pending):
                return
            os.sched_yield()
        self.asleep.value = 1
        if not any(self.replies[w].seq.value != self.read_seq[w] for w in pending):
            futex_wait(self.doorbell, ring, min(timeout, _SLEEP_SLICE))
        self.asleep.value = 0

    def close(self) -> None:
        # The mailboxes' views export the mapping; they must go before it can close.
        self.requests = self.replies = []
        self.doorbell = self.asleep = None
        self.segment.close()


def _layout(num_workers: int, request_capacity: int, reply_capacity: int) -> tuple[list[tuple[int, int]], int]:
    """Offsets of each worker's (request, reply) mailboxes after the 64-byte doorbell; total size."""
    offsets, position = [], 64
    for _ in range(num_workers):
        offsets.append((position, position + request_capacity))
        position += request_capacity + reply_capacity
    return offsets, position


class WorkerEnd:
    """A worker's side: takes requests, puts replies and rings the trainer's doorbell."""

    def __init__(self, buffer: memoryview, descriptor: dict, spin_seconds: float):
        self.buffer = buffer
        self.doorbell = ctypes.c_int32.from_buffer(buffer, 0)
        self.trainer_asleep = ctypes.c_int32.from_buffer(buffer, _ASLEEP)
        self.requests = Mailbox(buffer, *descriptor["request"])
        self.replies = Mailbox(buffer, *descriptor["reply"])
        self.ring_id = (descriptor["worker"] + 1) << 20
        self.rings = 0
        self.spin_seconds = spin_seconds
        self.last_seq = self.requests.seq.value

    def send(self, frames: Sequence[bytes | memoryview]) -> bool:
        fits = self.replies.write(frames)
        self.rings = (self.rings + 1) & 0xFFFFF
        self.doorbell.value = self.ring_id | self.rings
        if self.trainer_asleep.value:
            futex_wake(self.doorbell)
        return fits

    def wait(self) -> int | None:
        """Waits for a new request, spinning a little first, then sleeping at most one short slice.

        Returns its seq, or None if none came (so the caller can look at its socket too).
        """
        word = self.requests.seq
        deadline = time.perf_counter() + self.spin_seconds
        while True:
            seq = word.value
            if seq != self.last_seq and not seq & 1:
                self.last_seq = seq
                return seq
            if time.perf_counter() > deadline:
                self.requests.asleep.value = 1
                if word.value == seq:
                    futex_wait(word, seq, _SLEEP_SLICE)
                self.requests.asleep.value = 0
                if word.value == seq:
                    return None
            else:
                os.sched_yield()
