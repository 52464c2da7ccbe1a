"""One measurement of `envfarm bench`: one backend on one env and num_envs, in this process, with random actions.

A measurement builds a vector env, resets it, warms it up, times steps with pre-sampled random
actions (the `random` loop; envfarm/bench_training.py has the loops with a torch policy,
`--training`, and builds its vector envs and reads its costs with the functions here), and
closes it. Beside steps/s and the latency of a step call, it reads from /proc what the run cost:
CPU time of the trainer and its workers, and their memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

import envfarm
from envfarm.bench_config import BenchConfig, EnvCase
from envfarm.bench_ideal import IdealPair

ACTION_POOL = 64  # distinct pre-sampled batched actions, cycled through while timing
TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Measurement:
    """What one measurement found: a row of bench.json's "measurements"."""

    backend: str
    env_id: str
    num_envs: int
    repeat: int
    env_steps: int
    seconds: float
    steps_per_s: float
    p50_us: float  # latency of one step call (a batch of B envs for envfarm-async)
    p90_us: float
    p99_us: float
    startup_s: float  # construction and first reset
    worker_mib: float | None  # summed PSS of the worker processes; None where envs run in-process
    trainer_mib: float  # RSS of this process (it grows over a run: modules loaded, memory not returned)
    cpu_us_per_step: float | None = None  # CPU time of the trainer and its workers per env step
    loop: str = "random"


# ---------------------------------------------------------------------------------- the vector env


def start_envs(backend: str, case: EnvCase, num_envs: int, seed: int) -> tuple[Any, Callable[[int], Any], int]:
    """Builds and resets a vector env; returns it, a step function taking the index of a pre-sampled
    action, and the env steps each call makes."""
    if backend == "envfarm-async":
        batch = max(1, num_envs // 2)
        envs = envfarm.make_vec(case.env_id, num_envs, env_kwargs=case.kwargs, batch_size=batch)
        return envs, _async_stepper(envs, batch, seed), batch
    if backend in ("sync", "async"):
        vector_kwargs = {"shared_memory": True} if backend == "async" else {}
        envs = gym.make_vec(
            case.env_id, num_envs, vectorization_mode=backend, vector_kwargs=vector_kwargs, **case.kwargs
        )
        envs.reset(seed=seed)
    elif backend == "ideal":  # the limit of two processes in Python: see envfarm/bench_ideal.py
        envs = IdealPair(case.env_id, num_envs, case.kwargs, seed)
    elif backend == "envpool":
        import envpool

        envs = envpool.make_gymnasium(case.envpool_id, num_envs=num_envs, seed=seed, **case.envpool_kwargs)
        envs.reset()  # EnvPool takes its seed at construction
    else:
        options = {"envfarm": {}, "envfarm-wire": {"shared_memory": False}, "envfarm-inline": {"inline_worker": True}}[
            backend
        ]
        envs = envfarm.make_vec(case.env_id, num_envs, env_kwargs=case.kwargs, **options)
        envs.reset(seed=seed)
    actions = _action_pool(envs.single_action_space, num_envs, seed)
    return envs, lambda i: envs.step(actions[i % ACTION_POOL]), num_envs


def _async_stepper(envs: Any, batch: int, seed: int) -> Callable[[int], Any]:
    """Steps whichever `batch` envs finished first: send their actions, receive the next batch."""
    actions = _action_pool(envs.single_action_space, batch, seed)
    envs.async_reset(seed=seed)
    ready = [envs.recv(timeout=None)[4]["env_id"]]

    def step(i: int) -> None:
        envs.send(actions[i % ACTION_POOL], ready[0])
        ready[0] = envs.recv(timeout=None)[4]["env_id"]

    return step


def _action_pool(single_space: gym.Space, num_envs: int, seed: int) -> list[Any]:
    # Sampled before timing, so that Gymnasium's sampling cost is in no backend's numbers.
    space = batch_space(single_space, num_envs)
    space.seed(seed)
    return [space.sample() for _ in range(ACTION_POOL)]


# ---------------------------------------------------------------------------------- what it costs


def _proc_mib(pid: int, path: str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process (every thread) and of the processes `pids`, in seconds."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        except OSError:
            pass
    return total


def workers_pss_mib(pids: list[int]) -> float:
    """Summed PSS of the processes `pids`, in MiB."""
    # PSS, not RSS: forked workers share the trainer's pages, and summing RSS would count them once
    # per worker (64 AsyncVectorEnv workers against envfarm's 2 would look far worse than they are).
    return sum(_proc_mib(pid, "smaps_rollup", "Pss:") for pid in pids)


def trainer_rss_mib() -> float:
    """RSS of this process, in MiB."""
    return _proc_mib(os.getpid(), "status", "VmRSS:")


# ---------------------------------------------------------------------------------- the random loop


def measure(backend: str, case: EnvCase, num_envs: int, repeat: int, config: BenchConfig) -> Measurement:
    """One measurement: startup, warm-up, then timed steps, closing the vector env in any case."""
    begin = time.perf_counter()
    envs, step, per_call = start_envs(backend, case, num_envs, config.seed + repeat)
    startup = time.perf_counter() - begin
    try:
        for i in range(config.warmup):
            step(i)
        calls = max(1, math.ceil(config.steps / per_call))
        latencies = np.empty(calls)
        pids = [p.pid for p in getattr(envs, "processes", [])]
        cpu = cpu_seconds(pids)
        start = time.perf_counter()
        deadline = start + config.seconds
        done = 0
        while done < calls:
            t = time.perf_counter()
            step(done)
            now = time.perf_counter()
            latencies[done] = now - t
            done += 1
            if now > deadline:
                break
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pids) - cpu
        p50, p90, p99 = np.percentile(latencies[:done], [50, 90, 99]) * 1e6
        worker_mib = workers_pss_mib(pids) if pids else None
        trainer_mib = trainer_rss_mib()
    finally:
        envs.close()
    env_steps = done * per_call
    return Measurement(
        backend,
        case.env_id,
        num_envs,
        repeat,
        env_steps,
        elapsed,
        env_steps / elapsed,
        float(p50),
        float(p90),
        float(p99),
        startup,
        worker_mib,
        trainer_mib,
        cpu / env_steps * 1e6,
    )
