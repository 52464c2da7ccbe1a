"""Envs for the tests: deterministic given a seed, over every space envfarm carries."""

from __future__ import annotations

import copy
import os
import signal
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

OBSERVATION_SPACES: dict[str, spaces.Space] = {
    "box": spaces.Box(-1.0, 1.0, (3,), np.float32),
    "image": spaces.Box(0, 255, (8, 8, 3), np.uint8),
    "discrete": spaces.Discrete(5, start=2),
    "multidiscrete": spaces.MultiDiscrete([3, 4]),
    "multibinary": spaces.MultiBinary(6),
    "text": spaces.Text(8),
    "dict": spaces.Dict({"pos": spaces.Box(-2, 2, (2,), np.float64), "id": spaces.Discrete(4), "name": spaces.Text(5)}),
    "tuple": spaces.Tuple((spaces.Box(0, 1, (2, 2), np.float32), spaces.Discrete(3), spaces.MultiBinary(2))),
    "sequence": spaces.Sequence(spaces.Box(0, 1, (2,), np.float32)),
    "oneof": spaces.OneOf((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32))),
}

ACTION_SPACES: dict[str, spaces.Space] = {
    "discrete": spaces.Discrete(3),
    "box": spaces.Box(-1.0, 1.0, (2,), np.float32),
    "dict": spaces.Dict({"move": spaces.Discrete(4), "force": spaces.Box(0, 1, (1,), np.float32)}),
}


class ScriptedEnv(gym.Env):
    """Random but reproducible: episodes of random length, observations sampled from the space,
    infos of many types (some only on some steps), and the action echoed back in the info."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        obs: str = "box",
        act: str = "discrete",
        render_mode: str | None = None,
        fail_at_step: int | None = None,
        step_sleep: float = 0.0,
        crash_at_step: int | None = None,
        episode_length: tuple[int, int] = (3, 12),
    ):
        self.observation_space = copy.deepcopy(OBSERVATION_SPACES[obs])  # each env samples with its own RNG
        self.action_space = copy.deepcopy(ACTION_SPACES[act])
        self.render_mode = render_mode
        self.fail_at_step = fail_at_step
        self.crash_at_step = crash_at_step
        self.step_sleep = step_sleep
        self.episode_length = episode_length
        self.total_steps = 0
        self.t = 0
        self.length = 1

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        self.length = int(self.np_random.integers(*self.episode_length))
        info: dict[str, Any] = {"start": True, "length": self.length}
        if options:
            info["options_seen"] = sorted(options)
        return self.observation_space.sample(), info

    def step(self, action):
        if not self.action_space.contains(action):
            raise gym.error.InvalidAction(f"action {action!r} is not in {self.action_space}")
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.total_steps += 1
        if self.crash_at_step is not None and self.total_steps >= self.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at_step is not None and self.total_steps == self.fail_at_step:
            raise ValueError(f"scripted failure at step {self.total_steps}")
        self.t += 1
        terminated = self.t >= self.length
        truncated = bool(not terminated and self.np_random.random() < 0.05)
        info: dict[str, Any] = {
            "t": self.t,
            "total": np.int32(self.total_steps),
            "action": spaces.flatten(self.action_space, action),
            "nested": {"half": self.t * 0.5, "flag": bool(self.t % 2)},
            "label": f"step-{self.t}",
        }
        if self.t % 3 == 0:
            info["every_third"] = np.float32(self.t)
        return self.observation_space.sample(), float(self.np_random.normal()), terminated, truncated, info

    def render(self):
        return np.full((4, 4, 3), self.t, dtype=np.uint8)


class CounterEnv(gym.Env):
    """Observation = how many steps this env has taken; optionally slow."""

    observation_space = spaces.Box(0, np.inf, (1,), np.float64)
    action_space = spaces.Discrete(2)

    def __init__(self, step_sleep: float = 0.0):
        self.step_sleep = step_sleep
        self.count = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([self.count], np.float64), {"count": self.count}

    def step(self, action):
        time.sleep(self.step_sleep)
        self.count += 1
        return np.array([self.count], np.float64), 1.0, False, False, {"count": self.count}


class BrokenEnv(gym.Env):
    """Raises in its constructor."""

    def __init__(self):
        raise RuntimeError("this env cannot be built")


gym.register("envfarm-tests/Scripted-v0", entry_point=ScriptedEnv, max_episode_steps=50)


class FixedObsEnv(gym.Env):
    """Returns `obs` from reset and step whatever its Box(4) space says: None, a scalar, a wrong shape."""

    def __init__(self, obs: Any = None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.obs = obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.obs, {}

    def step(self, action):
        return self.obs, 0.0, False, False, {}

    def blas_threads(self) -> int:
        """The most threads a numeric library loaded in this process would use."""
        from threadpoolctl import threadpool_info

        return max((pool["num_threads"] for pool in threadpool_info()), default=1)
