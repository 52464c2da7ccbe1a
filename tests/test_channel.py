"""The same-host channel: mailboxes in shared memory, futex wake-ups, and when it spins."""

from __future__ import annotations

import threading
import time

import pytest
from interrupts import interrupt_the_next_mailbox_write

from envfarm.transport import channel
from envfarm.transport.channel import SpinPolicy, TrainerChannels, WorkerEnd
from envfarm.transport.segments import Segment

pytestmark = pytest.mark.skipif(not channel.available(), reason="the channel needs Linux on x86-64")


@pytest.fixture
def ends():
    capacities = (4096, 4096)
    segment = Segment(TrainerChannels.size(1, *capacities))
    trainer = TrainerChannels(segment, 1, *capacities, spin_seconds=200e-6)
    worker = WorkerEnd(memoryview(segment.buffer), trainer.descriptor(0), spin_seconds=1e-3)
    yield trainer, worker
    del worker
    trainer.close()


def test_messages_go_both_ways(ends):
    trainer, worker = ends
    assert trainer.send(0, [b"request", b"\x00" * 100])
    seq = worker.wait()
    assert seq is not None and [bytes(f) for f in worker.requests.read()] == [b"request", b"\x00" * 100]
    assert worker.send([b"reply"])
    trainer.wait([0], 1.0)
    assert trainer.new_reply(0) is not None and [bytes(f) for f in trainer.replies[0].read()] == [b"reply"]
    assert not trainer.send(0, [b"x" * 10_000])  # larger than the slot: the marker, and the socket carries it
    worker.wait()
    assert worker.requests.read() is None


def test_a_sleeping_reader_is_woken_at_once_not_after_its_sleep(ends):
    # A writer always wakes its reader on the word it changed: no wake-up is missed, so a reader
    # may sleep long. Here the worker would sleep 5 s without it.
    trainer, worker = ends
    worker.SLEEP = 5.0
    woke: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        while worker.wait() is None:
            pass
        woke.append(time.monotonic() - start)

    for _ in range(3):
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)  # it is asleep by now
        trainer.send(0, [b"wake up"])
        waiter.join(10)
        assert woke and woke[-1] < 2.0, f"woken after {woke[-1] if woke else 'never'} s"
        worker.send([b"done"])


def test_spinning_only_while_it_pays():
    policy = SpinPolicy(1e-3)
    assert policy.spin_for() == 1e-3  # still learning
    for _ in range(8):
        policy.waited(5e-3)  # the peer takes milliseconds (a policy's inference): spinning would only burn a core
    assert policy.spin_for() == 0.0
    for _ in range(8):
        policy.waited(50e-6)  # it answers within microseconds again: a futex wake-up would cost more
    assert policy.spin_for() == 1e-3


def test_a_write_cut_short_does_not_stop_the_next_one(ends, monkeypatch):
    # Ctrl-C can land in the trainer between a write's two stores of `seq`, leaving it odd ("being
    # written"). The next write must still be seen, or the worker never reads again.
    trainer, worker = ends
    interrupt_the_next_mailbox_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trainer.send(0, [b"cut short"])
    assert worker.wait() is None  # nothing complete to read
    assert trainer.send(0, [b"next"])
    assert worker.wait() is not None and [bytes(f) for f in worker.requests.read()] == [b"next"]
