"""Farm throughput and failure detection across hosts (network namespaces; root and iproute2 needed).

One namespace is a worker host with its own network and /dev/shm, joined to this one by a veth
pair; the broker and the trainer run here. Measures, interleaved: CartPole x16 on two remote
workers against local make_vec; 84x84x3 image observations against a raw ZeroMQ tcp stream
between the same hosts. Then the failure outcomes: the time from kill -9 or SIGSTOP of a remote
worker to the trainer's WorkerDiedError, from kill -9 to the step that reports the envs rebuilt
on a spare worker (on_failure="restart"), and the slowest step while the broker restarts.

    python3 docs/measure/farm.py
"""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import zmq

import envfarm
from envfarm.bench_envs import SYNTHETIC_ID
from envfarm.server.broker import Broker

NS, HERE, THERE, NET = f"efm{os.getpid()}", f"efmh{os.getpid()}", f"efmw{os.getpid()}", "10.233.77"


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def make_host() -> None:
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HERE, "type", "veth", "peer", "name", THERE)
    sh("ip", "link", "set", THERE, "netns", NS)
    sh("ip", "addr", "add", f"{NET}.1/24", "dev", HERE)
    sh("ip", "link", "set", HERE, "up")
    sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NET}.2/24", "dev", THERE)
    sh("ip", "netns", "exec", NS, "ip", "link", "set", THERE, "up")
    sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    sh("ip", "netns", "exec", NS, "ip", "route", "add", "default", "via", f"{NET}.1")


def remove_host() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HERE], capture_output=True)


def remote(command: str) -> subprocess.Popen:
    """Runs a shell command on the worker host, with a /dev/shm of its own."""
    return subprocess.Popen(
        ["ip", "netns", "exec", NS, "unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs /dev/shm && exec {command}"]
    )


def steps_per_second(envs, seconds: float = 3.0) -> float:
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(64)]
    for i in range(50):
        envs.step(actions[i % 64])
    start, steps, i = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        envs.step(actions[i % 64])
        steps += envs.num_envs
        i += 1
    return steps / (time.perf_counter() - start)


def tcp_bandwidth(seconds: float = 3.0) -> float:
    """Bytes/s of 1 MiB messages from the worker host to this one over ZeroMQ tcp."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port(f"tcp://{NET}.1")
    sender = remote(
        f"{sys.executable} -c \"import zmq; s = zmq.Context().socket(zmq.PUSH); s.connect('tcp://{NET}.1:{port}'); "
        f'm = bytes(1 << 20)\nwhile True: s.send(m)"'
    )
    try:
        pull.recv()
        start, received = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            received += len(pull.recv())
        return received / (time.perf_counter() - start)
    finally:
        sender.kill()
        sender.wait()
        pull.close(linger=0)
        context.term()


def start_workers(broker: Broker, count: int) -> list[subprocess.Popen]:
    known = set(broker.workers)
    workers = [
        remote(
            f"{sys.executable} -m envfarm worker --slots 8 --broker tcp://{NET}.1:{broker.endpoint.rsplit(':', 1)[1]}"
        )
        for _ in range(count)
    ]
    while len(set(broker.workers) - known) < count:
        time.sleep(0.1)
    return workers


def stop(workers: list[subprocess.Popen], broker: Broker | None = None) -> None:
    """Kills the workers; with `broker`, waits until it has struck them off."""
    for worker in workers:
        worker.send_signal(signal.SIGCONT)
        worker.kill()
        worker.wait()
    while broker is not None and broker.workers:
        time.sleep(0.1)


def time_to_error(envs, fault: signal.Signals) -> float:
    envs.reset(seed=0)
    os.kill(envs._workers[0].pid, fault)  # the pid is the worker's, in this PID namespace
    start = time.monotonic()
    try:
        while True:
            envs.step(envs.action_space.sample())
    except envfarm.WorkerDiedError:
        return time.monotonic() - start
    finally:
        envs.close()


def time_to_restart(envs) -> float:
    envs.reset(seed=0)
    os.kill(envs._workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    try:
        while "envfarm_restarted" not in envs.step(envs.action_space.sample())[4]:
            pass
        return time.monotonic() - start
    finally:
        envs.close()


def slowest_step_through_a_broker_restart(broker: Broker, farm: str) -> tuple[float, Broker, threading.Thread]:
    envs = envfarm.make_vec("CartPole-v1", 8, broker=farm)
    envs.reset(seed=0)
    broker.stop()
    slowest, start = 0.0, time.monotonic()
    again = None
    while time.monotonic() - start < 8:
        if again is None and time.monotonic() - start > 1:
            again = Broker(broker.endpoint)
            thread = threading.Thread(target=again.serve, daemon=True)
            thread.start()
        step_start = time.perf_counter()
        envs.step(envs.action_space.sample())
        slowest = max(slowest, time.perf_counter() - step_start)
    envs.close()
    return slowest, again, thread


def request_reply_bandwidth(peers: int, reply_bytes: int, seconds: float = 3.0) -> float:
    """Bytes/s of replies when this host asks `peers` processes on the worker host for `reply_bytes`
    each and waits for all of them, over and over: a step's pattern with no envs and no envfarm."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port(f"tcp://{NET}.1")
    code = (
        f"import zmq; s = zmq.Context().socket(zmq.DEALER); s.connect('tcp://{NET}.1:{port}'); s.send(b'hi'); "
        f"m = bytes({reply_bytes})\nwhile True: s.recv(); s.send(m)"
    )
    repliers = [remote(f'{sys.executable} -c "{code}"') for _ in range(peers)]
    try:
        identities = [router.recv_multipart()[0] for _ in range(peers)]
        start, received = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for identity in identities:
                router.send_multipart([identity, b"step"])
            for _ in identities:
                received += len(router.recv_multipart(copy=False)[1])
        return received / (time.perf_counter() - start)
    finally:
        for replier in repliers:
            replier.kill()
            replier.wait()
        router.close(linger=0)
        context.term()


def main() -> None:
    warnings.filterwarnings("ignore")
    make_host()
    broker = Broker("tcp://0.0.0.0:0")
    thread = threading.Thread(target=broker.serve, daemon=True)
    thread.start()
    workers = []
    try:
        workers = start_workers(broker, 2)
        farm = f"tcp://{NET}.1:{broker.endpoint.rsplit(':', 1)[1]}"
        ratios, ipc_ratios, image_rates = [], [], []
        for _ in range(3):
            local = envfarm.make_vec("CartPole-v1", 16)
            local_rate = steps_per_second(local)
            local.close()
            local_ipc = envfarm.make_vec("CartPole-v1", 16, shared_memory=False)  # ZeroMQ ipc only
            ipc_rate = steps_per_second(local_ipc)
            local_ipc.close()
            remote_envs = envfarm.make_vec("CartPole-v1", 16, broker=farm)
            remote_rate = steps_per_second(remote_envs)
            remote_envs.close()
            ratios.append(remote_rate / local_rate)
            ipc_ratios.append(remote_rate / ipc_rate)
            images = envfarm.make_vec(
                SYNTHETIC_ID, 16, broker=farm, env_kwargs={"step_cost_us": 0, "obs_shape": (84, 84, 3)}
            )
            image_rates.append(steps_per_second(images) * 84 * 84 * 3)
            images.close()
            print(
                f"CartPole x16: remote tcp {remote_rate:,.0f} steps/s; local ipc {ipc_rate:,.0f}: {ipc_ratios[-1]:.2f}x; "
                f"local default (shared memory) {local_rate:,.0f}: {ratios[-1]:.2f}x",
                flush=True,
            )
        bandwidth = tcp_bandwidth()
        request_reply = request_reply_bandwidth(2, 8 * 84 * 84 * 3)
        print(
            f"median remote tcp / local ipc, CartPole x16: {np.median(ipc_ratios):.2f}x; / local default: {np.median(ratios):.2f}x"
        )
        print(
            f"84x84x3 observations, 16 envs on 2 workers: {np.median(image_rates) / 1e6:,.1f} MB/s; raw ZeroMQ tcp stream: "
            f"{bandwidth / 1e6:,.1f} MB/s ({np.median(image_rates) / bandwidth:.2f}x); raw ZeroMQ request-reply of the same "
            f"shape (2 peers, 8 frames' bytes each): {request_reply / 1e6:,.1f} MB/s ({np.median(image_rates) / request_reply:.2f}x)",
            flush=True,
        )

        for fault in (signal.SIGKILL, signal.SIGSTOP):
            stop(workers, broker)
            workers = start_workers(broker, 1)
            seconds = time_to_error(envfarm.make_vec("CartPole-v1", 8, broker=farm), fault)
            print(
                f"{fault.name} of a remote worker: WorkerDiedError after {seconds:.2f} s (dead_after {broker.dead_after:g} s)",
                flush=True,
            )
        stop(workers, broker)
        workers = start_workers(broker, 2)
        seconds = time_to_restart(envfarm.make_vec("CartPole-v1", 8, broker=farm, on_failure="restart"))
        print(
            f"SIGKILL with on_failure='restart': envs rebuilt on the spare worker, reported {seconds:.2f} s after the kill",
            flush=True,
        )
        stop(workers, broker)
        workers = start_workers(broker, 1)
        slowest, broker, thread = slowest_step_through_a_broker_restart(broker, farm)
        print(
            f"broker stopped and restarted 1 s later, mid-run: slowest step {slowest * 1000:.1f} ms over 8 s of steps"
        )
    finally:
        stop(workers)
        broker.stop()
        thread.join(5)
        remove_host()


if __name__ == "__main__":
    main()
