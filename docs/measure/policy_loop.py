"""A training-like loop: the trainer spends `policy_us` of CPU per step (a policy's inference)
between steps. Steps/s of FarmVectorEnv against SyncVectorEnv, and CPU time per env step of all
the processes together, with the channel's adaptive spinning and with spinning always on (the
policy before issue 10). Medians of interleaved repeats, in one process.

    python3 docs/measure/policy_loop.py CartPole-v1 8
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import gymnasium as gym
import numpy as np

import envfarm
from envfarm.transport.channel import SpinPolicy

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def busy(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def run(envs, policy_us: float, steps: int) -> tuple[float, float]:
    """(env steps per second, CPU microseconds per env step, all processes)."""
    pids = [os.getpid(), *(p.pid for p in getattr(envs, "processes", []))]
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(64)]
    for i in range(50):
        busy(policy_us)
        envs.step(actions[i % 64])
    cpu, start = cpu_seconds(pids), time.perf_counter()
    for i in range(steps):
        busy(policy_us)
        envs.step(actions[i % 64])
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    return steps * envs.num_envs / elapsed, cpu * 1e6 / (steps * envs.num_envs)


def main() -> None:
    warnings.filterwarnings("ignore")
    env_id, num_envs = sys.argv[1], int(sys.argv[2])
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    adaptive = SpinPolicy.spin_for
    for policy_us in (0, 300, 2000):
        steps = 3000 if policy_us < 1000 else 1000
        results: dict[str, list[tuple[float, float]]] = {"sync": [], "envfarm": [], "envfarm, always spinning": []}
        for _ in range(repeats):
            for name in results:
                SpinPolicy.spin_for = (lambda self: self.budget) if name.endswith("spinning") else adaptive
                envs = (
                    gym.make_vec(env_id, num_envs, vectorization_mode="sync")
                    if name == "sync"
                    else envfarm.make_vec(env_id, num_envs)
                )
                try:
                    results[name].append(run(envs, policy_us, steps))
                finally:
                    envs.close()
        SpinPolicy.spin_for = adaptive
        anchor = np.median([sps for sps, _ in results["sync"]])
        for name, values in results.items():
            sps, cpu = np.median([v[0] for v in values]), np.median([v[1] for v in values])
            print(
                f"{env_id} x{num_envs}, policy {policy_us} us: {name}: {sps / anchor:.2f}x sync ({sps:.0f} steps/s), {cpu:.0f} us CPU per env step"
            )


if __name__ == "__main__":
    main()
