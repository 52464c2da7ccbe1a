"""A synthetic env for `envfarm bench`: a step that costs a set amount of CPU and an image of a set size.

It lives in the package (not in the bench script) so that worker processes, forked or spawned,
can build it from its registered id.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np

HEAVY_TAIL_ID = "envfarm/HeavyTail-v0"
SYNTHETIC_ID = "envfarm/Synthetic-v0"


class SyntheticEnv(gym.Env):
    """Burns `step_cost_us` microseconds of CPU per step and returns a uint8 image of `obs_shape`.

    Args:
        step_cost_us: CPU time each step spends, busy-waiting.
        obs_shape: Shape of the uint8 Box observation, e.g. (84, 84, 3).
        episode_length: Steps until the episode is truncated.
        slow_step_probability: Chance that a step costs `slow_step_factor` times more (a heavy
            tail, as physics solvers and renderers have), drawn from the env's own RNG.
        slow_step_factor: How much more a slow step costs.
        build_seconds: How long construction takes (sleeping), as a simulator loading its assets.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        step_cost_us: float = 1000.0,
        obs_shape: tuple[int, ...] = (84, 84, 3),
        episode_length: int = 1000,
        slow_step_probability: float = 0.0,
        slow_step_factor: float = 10.0,
        build_seconds: float = 0.0,
    ):
        time.sleep(build_seconds)
        self.step_cost_ns = int(step_cost_us * 1000)
        self.slow_step_probability = slow_step_probability
        self.slow_step_factor = slow_step_factor
        self.obs_shape = tuple(obs_shape)
        self.episode_length = episode_length
        self.observation_space = gym.spaces.Box(0, 255, self.obs_shape, np.uint8)
        self.action_space = gym.spaces.Discrete(4)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(self.obs_shape, np.uint8), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        # Thread CPU time, not wall time: on a busy machine a wall-clock wait would cost less CPU
        # than asked whenever the process is descheduled, flattering whoever oversubscribes.
        cost = self.step_cost_ns
        if self.slow_step_probability and self.np_random.random() < self.slow_step_probability:
            cost = int(cost * self.slow_step_factor)
        deadline = time.thread_time_ns() + cost
        while time.thread_time_ns() < deadline:
            pass
        self._t += 1
        # A fresh array each step, as a real env renders a new frame.
        obs = np.full(self.obs_shape, self._t & 0xFF, np.uint8)
        return obs, float(action == self._t % 4), False, self._t >= self.episode_length, {}


if SYNTHETIC_ID not in gym.registry:
    gym.register(SYNTHETIC_ID, entry_point="envfarm.bench_envs:SyntheticEnv")
if HEAVY_TAIL_ID not in gym.registry:
    # Steps of 200 us of CPU, one in ten 20x longer, small observations: where recv() should not wait for the slowest.
    gym.register(
        HEAVY_TAIL_ID,
        entry_point="envfarm.bench_envs:SyntheticEnv",
        kwargs={"step_cost_us": 200.0, "obs_shape": (16,), "slow_step_probability": 0.1, "slow_step_factor": 20.0},
    )
