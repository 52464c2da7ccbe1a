"""A farm trainer's data port faces the network: what a stranger sends there must neither bloat
the trainer nor stall its steps (plaintext farm: anyone who reaches the port can connect)."""

from __future__ import annotations

import os
import threading
import time

import zmq
from farms import start_farm

import envfarm
from envfarm.protocol import messages as m
from envfarm.protocol.packing import pack


def stranger(endpoint: str, context: zmq.Context) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, m.WORKER_PREFIX + os.urandom(15))  # poses as a worker not leased yet
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def test_unsolicited_hellos_are_not_kept_beyond_a_small_bound():
    with start_farm(1, 2) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint)
        context = zmq.Context()
        try:
            envs.reset(seed=0)
            hello = pack(m.make(m.HELLO, 0, version=m.PROTOCOL_VERSION, pid=1, host="x" * (20 << 20)))  # 20 MB each
            strangers = [stranger(envs._router.endpoint, context) for _ in range(55)]
            small = pack(m.make(m.HELLO, 0, version=m.PROTOCOL_VERSION, pid=1, host="h"))
            for i, socket in enumerate(strangers):
                socket.send_multipart(hello if i < 5 else small)
            time.sleep(2.0)
            for _ in range(20):
                envs.step(envs.action_space.sample())
            early = envs._router._early
            assert 0 < len(early) <= 50  # small HELLOs are kept (at most 1024 of them)
            assert all(len(message["host"]) < 1024 for message in early.values())  # the large ones were dropped
        finally:
            envs.close()
            context.destroy(linger=0)


def test_a_flood_of_tiny_frames_does_not_stall_steps():
    with start_farm(1, 2) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, shared_memory=False)
        context = zmq.Context()

        def flood() -> None:
            socket = stranger(envs._router.endpoint, context)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    socket.send(b"\x00", zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.001)
            socket.close()

        flooder = threading.Thread(target=flood)
        try:
            envs.reset(seed=0)
            flooder.start()
            slowest, steps, end = 0.0, 0, time.monotonic() + 3
            while time.monotonic() < end:
                start = time.monotonic()
                envs.step(envs.action_space.sample())
                slowest, steps = max(slowest, time.monotonic() - start), steps + 1
            # Not a speed figure: a stall bound. A step takes about a millisecond; before, a flood
            # kept the trainer draining the port for up to 3.9 s per step.
            assert slowest < 1.0, f"a step took {slowest:.2f} s during the flood ({steps} steps)"
        finally:
            flooder.join(10)
            envs.close()
            context.destroy(linger=0)
