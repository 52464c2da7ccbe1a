"""Where a step of the inline arrangement goes, in the trainer: wall time per vector step inside
each stage, by timing wrappers (each adds about a microsecond), then a SyncVectorEnv of the
trainer's 4 envs for comparison.

    python3 docs/measure/inline_step.py CartPole-v1 8
"""

import collections
import sys
import time
import warnings

import gymnasium as gym

import envfarm
from envfarm.client import routes, vector_env
from envfarm.server import hosted_envs, request_handler

warnings.filterwarnings("ignore")
spent: collections.Counter = collections.Counter()


def timed(owner: type, name: str, label: str) -> None:
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter_ns() - start

    setattr(owner, name, wrapper)


timed(vector_env.FarmVectorEnv, "step_async", "step_async")
timed(routes.InlineRoute, "send", "  the trainer's block (InlineRoute.send)")
timed(request_handler.RequestHandler, "handle", "    RequestHandler.handle")
timed(hosted_envs.HostedEnvs, "step", "      HostedEnvs.step")
timed(gym.wrappers.OrderEnforcing, "step", "        the envs' own steps (with wrappers)")
timed(vector_env.FarmVectorEnv, "step_wait", "step_wait (the worker's reply included)")

env_id, num_envs, steps = sys.argv[1], int(sys.argv[2]), 20000
envs = envfarm.make_vec(env_id, num_envs, inline_worker=True, num_workers=2)
envs.reset(seed=0)
actions = [envs.action_space.sample() for _ in range(64)]
for i in range(500):
    envs.step(actions[i % 64])
spent.clear()
start = time.perf_counter_ns()
for i in range(steps):
    envs.step(actions[i % 64])
total = time.perf_counter_ns() - start
envs.close()
print(f"{env_id} x{num_envs}, inline: {total / steps / 1000:.1f} us per step")
for label, ns in spent.items():
    print(f"  {label:44} {ns / steps / 1000:6.1f} us")
block = num_envs // 2
sync = gym.make_vec(env_id, block, vectorization_mode="sync")
sync.reset(seed=0)
start = time.perf_counter_ns()
for i in range(steps):
    sync.step(actions[i % 64][:block])
print(f"SyncVectorEnv of {block} envs: {(time.perf_counter_ns() - start) / steps / 1000:.1f} us per step")
