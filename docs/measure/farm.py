"""Farm throughput and failure detection across hosts (network namespaces; root and iproute2 needed).

One namespace is a worker host with its own network and /dev/shm, joined to this one by a veth
pair. Measures, interleaved: CartPole x16 through the broker to two remote workers against local
make_vec; 84x84x3 image observations against a raw ZeroMQ tcp stream between the same hosts; the
time from killing a remote worker to the trainer's WorkerDiedError.

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


def remove_host() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HERE], capture_output=True)


def remote(command: str) -> subprocess.Popen:
    """Runs a shell command on the worker host, with a /dev/shm of its own."""
    return subprocess.Popen(["ip", "netns", "exec", NS, "unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs /dev/shm && exec {command}"])


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
        f"m = bytes(1 << 20)\nwhile True: s.send(m)\""
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


def main() -> None:
    warnings.filterwarnings("ignore")
    make_host()
    broker = Broker("tcp://0.0.0.0:0")
    port = broker.endpoint.rsplit(":", 1)[1]
    thread = threading.Thread(target=broker.serve, daemon=True)
    thread.start()
    workers = [remote(f"{sys.executable} -m envfarm worker --slots 8 --broker tcp://{NET}.1:{port}") for _ in range(2)]
    try:
        while len(broker.workers) < 2:
            time.sleep(0.1)
        farm = f"tcp://127.0.0.1:{port}"
        ratios, image_rates = [], []
        for _ in range(3):
            local = envfarm.make_vec("CartPole-v1", 16)
            local_rate = steps_per_second(local)
            local.close()
            remote_envs = envfarm.make_vec("CartPole-v1", 16, broker=farm)
            remote_rate = steps_per_second(remote_envs)
            remote_envs.close()
            ratios.append(remote_rate / local_rate)
            images = envfarm.make_vec(SYNTHETIC_ID, 16, broker=farm, env_kwargs={"step_cost_us": 0, "obs_shape": (84, 84, 3)})
            image_rates.append(steps_per_second(images) * 84 * 84 * 3)
            images.close()
            print(f"CartPole x16: remote {remote_rate:,.0f} steps/s, local {local_rate:,.0f}: {ratios[-1]:.2f}x", flush=True)
        bandwidth = tcp_bandwidth()
        print(f"median remote/local CartPole x16: {np.median(ratios):.2f}x")
        print(f"84x84x3 observations: {np.median(image_rates) / 1e6:,.1f} MB/s; raw ZeroMQ tcp: {bandwidth / 1e6:,.1f} MB/s; "
              f"{np.median(image_rates) / bandwidth:.2f}x")
        envs = envfarm.make_vec("CartPole-v1", 8, broker=farm)
        envs.reset(seed=0)
        os.kill(envs._workers[0].pid, signal.SIGKILL)  # the pid is the worker's, in this PID namespace
        start = time.monotonic()
        try:
            while True:
                envs.step(envs.action_space.sample())
        except envfarm.WorkerDiedError:
            print(f"killed worker reported after {time.monotonic() - start:.2f} s (broker dead_after {broker.dead_after:g} s)")
        envs.close()
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
        broker.stop()
        thread.join(5)
        remove_host()


if __name__ == "__main__":
    main()
