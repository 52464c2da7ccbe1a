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

import collections
import ctypes
import os
import platform
import struct
import sys
import time
from typing import Sequence

from envfarm.transport.segments import Segment

_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
# A mailbox: seq (int32) at 0, 4 bytes unused, frame count (uint32) at 8, frame sizes (uint64)
# from 16, then the frames. The segment starts with the doorbell (int32) at 0.
_COUNT, _SIZES = 8, 16
# A writer changes the word its reader sleeps on, then always wakes it (a syscall of about a
# microsecond when nobody sleeps). The kernel compares the word before it puts a reader to sleep,
# so no wake-up is ever missed, and a reader may sleep until it has something else to look at.
_ALIGN = 16
_RECENT = 8  # waits remembered to decide whether spinning pays


class SpinPolicy:
    """Spins only where it pays: while the median of the recent waits is within the budget (the
    peer answers within microseconds: a futex wake-up would cost more than the wait), never when
    the peer takes milliseconds (a trainer running its policy, a worker stepping an expensive env):
    that CPU belongs to the peer and to the envs, not to a busy loop."""

    def __init__(self, budget: float):
        self.budget = budget
        self.recent: collections.deque[float] = collections.deque(maxlen=_RECENT)

    def spin_for(self) -> float:
        if len(self.recent) < _RECENT // 2:
            return self.budget  # still learning
        return self.budget if sorted(self.recent)[len(self.recent) // 2] <= self.budget else 0.0

    def waited(self, seconds: float) -> None:
        self.recent.append(seconds)


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
        self.buffer = buffer
        self.offset = offset
        self.capacity = capacity

    def write(self, frames: Sequence[bytes | memoryview]) -> bool:
        """Replaces the slot's message; False (and the zero-frame marker) if it does not fit."""
        frames = [frame if type(frame) is bytes else memoryview(frame).cast("B") for frame in frames]
        sizes = [len(frame) for frame in frames]
        start = self.offset + _aligned(_SIZES + 8 * len(sizes))
        fits = start + sum(_aligned(size) for size in sizes) <= self.offset + self.capacity
        if not fits:
            frames = sizes = []
        # Even: a write cut short between its two stores (a KeyboardInterrupt in the trainer) left
        # `seq` odd, and adding 2 to an odd seq would mark every later message as still being written.
        seq = self.seq.value & ~1
        self.seq.value = seq + 1
        _header(len(sizes)).pack_into(self.buffer, self.offset + _COUNT, len(sizes), *sizes)
        position = start
        for frame, size in zip(frames, sizes):
            self.buffer[position : position + size] = frame
            position += _aligned(size)
        self.seq.value = seq + 2
        return fits

    def read(self) -> list[memoryview] | None:
        """The message in the slot as views (valid until the next write), or None for the marker.

        Check `seq` again after decoding the views, and before acting on None: if the writer
        overwrote the slot meanwhile, what was read is torn and must be read again. (A header
        being written passes through zeros, since struct.pack_into clears its bytes first, so a
        torn read can look like the marker.)
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


_headers: dict[int, struct.Struct] = {}


def _header(count: int) -> struct.Struct:
    """The layout of a mailbox's frame count (at _COUNT) and `count` frame sizes (from _SIZES)."""
    header = _headers.get(count)
    if header is None:
        header = _headers[count] = struct.Struct(f"<I{_SIZES - _COUNT - 4}x{count}Q")
    return header


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


class TrainerChannels:
    """The trainer's side: one shared buffer holding every local worker's pair of mailboxes.

    `segment` is a transport.segments.Segment of `size(...)` bytes; the trainer creates and
    unlinks it.
    """

    @staticmethod
    def size(num_workers: int, request_capacity: int, reply_capacity: int) -> int:
        return _layout(num_workers, request_capacity, reply_capacity)[1]

    def __init__(
        self, segment: Segment, num_workers: int, request_capacity: int, reply_capacity: int, spin_seconds: float
    ):
        slots, size = _layout(num_workers, request_capacity, reply_capacity)
        if segment.size < size:
            raise ValueError(
                f"the channels of {num_workers} workers need a segment of {size} bytes, got {segment.size}"
            )
        self.segment = segment
        buffer = memoryview(segment.buffer)
        self.slots = slots
        self.requests = [Mailbox(buffer, offset, request_capacity) for offset, _ in slots]
        self.replies = [Mailbox(buffer, offset, reply_capacity) for _, offset in slots]
        self.read_seq = [0] * num_workers
        self.doorbell = ctypes.c_int32.from_buffer(buffer, 0)
        self.spin = SpinPolicy(spin_seconds)

    def descriptor(self, worker: int) -> dict:
        request, reply = self.slots[worker]
        return {
            **self.segment.descriptor(),
            "worker": worker,
            "request": [request, self.requests[worker].capacity],
            "reply": [reply, self.replies[worker].capacity],
        }

    def send(self, worker: int, frames: Sequence[bytes | memoryview]) -> bool:
        mailbox = self.requests[worker]
        fits = mailbox.write(frames)
        futex_wake(mailbox.seq)
        return fits

    def new_reply(self, worker: int) -> int | None:
        """The seq of a reply not seen yet from this worker, or None."""
        seq = self.replies[worker].seq.value
        if seq == self.read_seq[worker] or seq & 1:
            return None
        self.read_seq[worker] = seq
        return seq

    def wait(self, pending: Sequence[int], timeout: float) -> bool:
        """Returns when a reply may have come from one of `pending` (True), or after `timeout` seconds."""
        start = time.perf_counter()
        ring = self.doorbell.value
        if not self._arrived(pending):
            deadline = start + min(self.spin.spin_for(), timeout)
            while time.perf_counter() < deadline:
                if self._arrived(pending):
                    break
                os.sched_yield()
            else:
                futex_wait(self.doorbell, ring, max(0.0, timeout - (time.perf_counter() - start)))
        if not self._arrived(pending):
            return False  # a wait that ended in a timeout teaches nothing about the workers
        self.spin.waited(time.perf_counter() - start)
        return True

    def _arrived(self, pending: Sequence[int]) -> bool:
        return any(self.replies[w].seq.value != self.read_seq[w] for w in pending)

    def close(self) -> None:
        # The mailboxes' views export the mapping; they must go before it can close.
        self.requests = self.replies = []
        self.doorbell = None
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

    SLEEP = 0.05  # seconds between looks at the worker's sockets while no request comes

    def __init__(self, buffer: memoryview, descriptor: dict, spin_seconds: float):
        self.buffer = buffer
        self.doorbell = ctypes.c_int32.from_buffer(buffer, 0)
        self.requests = Mailbox(buffer, *descriptor["request"])
        self.replies = Mailbox(buffer, *descriptor["reply"])
        self.ring_id = (descriptor["worker"] + 1) << 20
        self.rings = 0
        self.spin = SpinPolicy(spin_seconds)
        self.replied_at: float | None = None  # when the last reply went, until the next request came
        self.last_seq = self.requests.seq.value

    def send(self, frames: Sequence[bytes | memoryview]) -> bool:
        fits = self.replies.write(frames)
        self.rings = (self.rings + 1) & 0xFFFFF
        self.doorbell.value = self.ring_id | self.rings
        futex_wake(self.doorbell)
        self.replied_at = time.perf_counter()
        return fits

    def wait(self) -> int | None:
        """Waits for a new request: spins first only right after a reply, and only while spinning
        pays (see SpinPolicy), then sleeps on the request word for at most SLEEP.

        Returns its seq, or None if none came (so the caller can look at its sockets too).
        """
        word = self.requests.seq
        seq = self._new(word.value)
        if seq is None and self.replied_at is not None:
            deadline = self.replied_at + self.spin.spin_for()
            while seq is None and time.perf_counter() < deadline:
                os.sched_yield()
                seq = self._new(word.value)
        if seq is None:
            current = word.value
            futex_wait(word, current, self.SLEEP)
            seq = self._new(word.value)
        if seq is not None and self.replied_at is not None:
            self.spin.waited(time.perf_counter() - self.replied_at)  # the trainer's time between reply and request
            self.replied_at = None
        return seq

    def _new(self, seq: int) -> int | None:
        if seq == self.last_seq or seq & 1:
            return None
        self.last_seq = seq
        return seq
