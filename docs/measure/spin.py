"""Spin budgets of the same-host channel: FarmVectorEnv steps/s against SyncVectorEnv for several
(worker, trainer) busy-wait budgets, medians of interleaved repeats. See client/worker_pool.py.

    python3 docs/measure/spin.py CartPole-v1 16
    python3 docs/measure/spin.py HalfCheetah-v5 8
"""

import sys
import time
import warnings

import gymnasium as gym
import numpy as np

import envfarm
import envfarm.client.worker_pool as worker_pool

BUDGETS = [(100e-6, 100e-6), (1e-3, 100e-6), (1e-3, 1e-3)]  # (worker, trainer) seconds


def steps_per_second(envs, steps: int = 1000) -> float:
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(64)]
    for i in range(100):
        envs.step(actions[i % 64])
    start = time.perf_counter()
    for i in range(steps):
        envs.step(actions[i % 64])
    return steps * envs.num_envs / (time.perf_counter() - start)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    env_id, num_envs = sys.argv[1], int(sys.argv[2])
    ratios = {budget: [] for budget in BUDGETS}
    for _ in range(3):
        sync = gym.make_vec(env_id, num_envs, vectorization_mode="sync")
        anchor = steps_per_second(sync)
        sync.close()
        for budget in BUDGETS:
            worker_pool.WORKER_SPIN_SECONDS, worker_pool.TRAINER_SPIN_SECONDS = budget
            envs = envfarm.make_vec(env_id, num_envs)
            ratios[budget].append(steps_per_second(envs) / anchor)
            envs.close()
    for (worker, trainer), values in ratios.items():
        print(
            f"{env_id} x{num_envs}: worker spin {worker * 1e6:.0f} us, trainer spin {trainer * 1e6:.0f} us: {np.median(values):.2f}x sync"
        )
