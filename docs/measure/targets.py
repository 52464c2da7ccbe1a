"""The performance targets that `envfarm bench` does not cover, each against an anchor measured in
the same run (medians of interleaved repeats). See docs/benchmarks.md.

    python3 docs/measure/targets.py
"""

import multiprocessing
import os
import time
import warnings

import gymnasium as gym
import numpy as np

import envfarm
from envfarm.bench_envs import HEAVY_TAIL_ID, SYNTHETIC_ID

REPEATS = 5


def echo(connection) -> None:
    while (message := connection.recv()) is not None:
        connection.send(message)


def overhead_against_pipe() -> None:
    """A vector step of a trivial env (2 workers) against a multiprocessing Pipe round trip."""
    results: dict[str, list[float]] = {"pipe": [], "envfarm": []}
    n = 5000
    for _ in range(REPEATS):
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.Process(target=echo, args=(child,))
        process.start()
        message = np.zeros(4, np.float32)
        start = time.perf_counter()
        for _ in range(n):
            parent.send(message)
            parent.recv()
        results["pipe"].append((time.perf_counter() - start) / n * 1e6)
        parent.send(None)
        process.join()
        envs = envfarm.make_vec(SYNTHETIC_ID, 2, env_kwargs={"step_cost_us": 0, "obs_shape": (4,)}, num_workers=2)
        envs.reset(seed=0)
        action = envs.action_space.sample()
        for _ in range(200):
            envs.step(action)
        start = time.perf_counter()
        for _ in range(n):
            envs.step(action)
        results["envfarm"].append((time.perf_counter() - start) / n * 1e6)
        envs.close()
    pipe, farm = np.median(results["pipe"]), np.median(results["envfarm"])
    print(
        f"overhead per vector step (trivial env, 2 workers): {farm:.1f} us; Pipe round trip {pipe:.1f} us; ratio {farm / pipe:.2f}"
    )


def make_cartpole() -> gym.Env:
    return gym.make("CartPole-v1")


def startup_with_spawn() -> None:
    """16 CartPole envs, construction plus first reset, context="spawn"."""
    results: dict[str, list[float]] = {"AsyncVectorEnv": [], "envfarm": []}
    for _ in range(3):
        start = time.perf_counter()
        envs = gym.vector.AsyncVectorEnv([make_cartpole] * 16, context="spawn")
        envs.reset(seed=0)
        results["AsyncVectorEnv"].append(time.perf_counter() - start)
        envs.close()
        start = time.perf_counter()
        envs = envfarm.make_vec("CartPole-v1", 16, context="spawn")
        envs.reset(seed=0)
        results["envfarm"].append(time.perf_counter() - start)
        envs.close()
    anchor, farm = np.median(results["AsyncVectorEnv"]), np.median(results["envfarm"])
    print(f"startup, 16 envs, spawn: envfarm {farm:.2f} s; AsyncVectorEnv {anchor:.2f} s; ratio {farm / anchor:.2f}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def memory_over_a_million_steps() -> None:
    envs = envfarm.make_vec("CartPole-v1", 16)
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(64)]
    pids = [process.pid for process in envs.processes]
    for i in range(62_500):
        envs.step(actions[i % 64])
        if i + 1 in (6_250, 62_500):
            print(
                f"after {16 * (i + 1):>9,} steps: trainer RSS {rss_mib(os.getpid()):.1f} MiB, workers {[round(rss_mib(p), 1) for p in pids]} MiB"
            )
    envs.close()


def recv_against_step_with_heavy_tails() -> None:
    """16 envs whose steps cost 200 us, one in ten 20x more: send/recv (batch 8) against step."""
    results: dict[str, list[float]] = {"step": [], "recv": []}
    seconds = 3.0
    for _ in range(3):
        envs = envfarm.make_vec(HEAVY_TAIL_ID, 16)
        envs.reset(seed=0)
        action = envs.action_space.sample()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            envs.step(action)
            steps += 16
        results["step"].append(steps / (time.perf_counter() - start))
        envs.close()
        envs = envfarm.make_vec(HEAVY_TAIL_ID, 16, batch_size=8)
        envs.async_reset(seed=0)
        ids = envs.recv()[4]["env_id"]
        actions = np.zeros(8, np.int64)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            envs.send(actions, ids)
            ids = envs.recv()[4]["env_id"]
            steps += 8
        results["recv"].append(steps / (time.perf_counter() - start))
        envs.close()
    step, recv = np.median(results["step"]), np.median(results["recv"])
    print(f"heavy-tailed steps: send/recv {recv:,.0f} steps/s; step {step:,.0f} steps/s; ratio {recv / step:.2f}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    overhead_against_pipe()
    startup_with_spawn()
    memory_over_a_million_steps()
    recv_against_step_with_heavy_tails()
