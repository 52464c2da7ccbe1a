"""Round trip of a tiny message between two processes: ZeroMQ (ipc), a raw pipe, a futex on shared
memory with and without spinning. Why envfarm's same-host channel exists (docs/benchmarks.md).

    python3 docs/measure/wakeup_rtt.py
"""

import ctypes
import mmap
import os
import time

import zmq

N = 20000
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FUTEX, _WAIT, _WAKE = 202, 0, 1  # x86-64


def zmq_rtt() -> float:
    endpoint = f"ipc://@envfarm-measure-{os.getpid()}"
    if os.fork() == 0:
        socket = zmq.Context().socket(zmq.DEALER)
        socket.connect(endpoint)
        socket.send(b"hello")
        while (message := socket.recv()) != b"quit":
            socket.send(message)
        os._exit(0)
    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(endpoint)
    peer, _ = router.recv_multipart()
    start = time.perf_counter()
    for _ in range(N):
        router.send_multipart([peer, b"x" * 100])
        router.recv_multipart()
    elapsed = time.perf_counter() - start
    router.send_multipart([peer, b"quit"])
    os.wait()
    return elapsed / N * 1e6


def pipe_rtt() -> float:
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    if os.fork() == 0:
        while (byte := os.read(r1, 1)) != b"q":
            os.write(w2, byte)
        os._exit(0)
    start = time.perf_counter()
    for _ in range(N):
        os.write(w1, b"x")
        os.read(r2, 1)
    elapsed = time.perf_counter() - start
    os.write(w1, b"q")
    os.wait()
    return elapsed / N * 1e6


def futex_rtt(spin: int) -> float:
    memory = mmap.mmap(-1, 4096)
    request = ctypes.c_int32.from_buffer(memory, 0)
    reply = ctypes.c_int32.from_buffer(memory, 64)

    def wait(word: ctypes.c_int32, old: int) -> int:
        for _ in range(spin):
            if word.value != old:
                return word.value
        while word.value == old:
            _libc.syscall(_SYS_FUTEX, ctypes.byref(word), _WAIT, old, None, None, 0)
        return word.value

    def set_and_wake(word: ctypes.c_int32, value: int) -> None:
        word.value = value
        _libc.syscall(_SYS_FUTEX, ctypes.byref(word), _WAKE, 1, None, None, 0)

    if os.fork() == 0:
        seen = 0
        while (seen := wait(request, seen)) >= 0:
            set_and_wake(reply, seen)
        os._exit(0)
    start = time.perf_counter()
    for i in range(1, N + 1):
        set_and_wake(request, i)
        wait(reply, i - 1)
    elapsed = time.perf_counter() - start
    set_and_wake(request, -1)
    os.wait()
    return elapsed / N * 1e6


if __name__ == "__main__":
    print(f"ZeroMQ ipc round trip      {zmq_rtt():7.1f} us")
    print(f"pipe round trip            {pipe_rtt():7.1f} us")
    print(f"futex, sleeping peer       {futex_rtt(0):7.1f} us")
    print(f"futex, peer spins first    {futex_rtt(2000):7.1f} us")
