"""A trainer on the host using the compose farm: `python3 docker/example_trainer.py [tcp://127.0.0.1:5555]`.

Runs a random policy on 16 CartPole envs leased from the farm, with the restart policy, and prints
throughput and how many envs had to be restarted.
"""

import sys
import time

import numpy as np

import envfarm

broker = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
envs = envfarm.make_vec("CartPole-v1", 16, broker=broker, on_failure="restart")
try:
    envs.reset(seed=0)
    restarted, start, steps = 0, time.perf_counter(), 0
    while steps < 50_000:
        _, _, _, _, info = envs.step(envs.action_space.sample())
        restarted += int(np.sum(info.get("_envfarm_restarted", 0)))
        steps += envs.num_envs
    print(
        f"{steps} steps from {envs.num_workers} farm workers at {steps / (time.perf_counter() - start):,.0f} steps/s; {restarted} envs restarted"
    )
finally:
    envs.close()
