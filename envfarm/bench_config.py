"""What `envfarm bench` measures: its backends, its envs, the settings of a run and the command that repeats them.

The rest of the bench reads these: envfarm/bench_run.py plans and runs a BenchConfig,
envfarm/bench_measure.py and envfarm/bench_training.py build an EnvCase under a backend, and
envfarm/bench.py turns the command line into a BenchConfig.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from envfarm.bench_envs import HEAVY_TAIL_ID, SYNTHETIC_ID

BACKENDS = ("sync", "async", "envpool", "envfarm", "envfarm-wire", "envfarm-inline", "envfarm-async", "ideal")
INSTALL_HINT = "pip install 'envfarm[bench]'"


@dataclasses.dataclass(frozen=True)
class EnvCase:
    """One env of the bench, as Gymnasium and (where it has it) EnvPool name it."""

    key: str
    env_id: str
    kwargs: dict[str, Any]
    requires: tuple[str, ...] = ()
    envpool_id: str | None = None
    envpool_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BenchConfig:
    envs: tuple[str, ...] = ("cartpole", "halfcheetah", "pong", "synthetic", "tail")
    num_envs: tuple[int, ...] = (8, 16, 32, 64)
    backends: tuple[str, ...] = BACKENDS
    repeats: int = 3
    steps: int = 20_000  # env steps timed per measurement, at most...
    seconds: float = 2.0  # ...and for at most this long, so slow envs do not dominate the run
    warmup: int = 5  # untimed steps (calls) after reset
    synthetic_step_us: float = 1000.0
    synthetic_obs: tuple[int, ...] = (84, 84, 3)
    seed: int = 0
    loops: tuple[str, ...] = ("random",)  # who picks the actions: see envfarm/bench_training.py


def env_cases(config: BenchConfig) -> dict[str, EnvCase]:
    """The bench's envs by key; EnvPool's Pong is set up to match Gymnasium's ALE/Pong-v5 (RGB, no stacking)."""
    synthetic = {"step_cost_us": config.synthetic_step_us, "obs_shape": config.synthetic_obs}
    pong_like_ale = {
        "img_height": 210,
        "img_width": 160,
        "gray_scale": False,
        "stack_num": 1,
        "noop_max": 1,
        "use_fire_reset": False,
        "repeat_action_probability": 0.25,
    }
    cases = [
        EnvCase("cartpole", "CartPole-v1", {}, envpool_id="CartPole-v1"),
        EnvCase("halfcheetah", "HalfCheetah-v5", {}, ("mujoco",), "HalfCheetah-v5"),
        EnvCase("pong", "ALE/Pong-v5", {}, ("ale_py",), "Pong-v5", pong_like_ale),
        EnvCase("synthetic", SYNTHETIC_ID, synthetic),
        EnvCase("tail", HEAVY_TAIL_ID, {}),
    ]
    return {case.key: case for case in cases}


def command_line(config: BenchConfig) -> str:
    """The `envfarm bench` command that runs exactly `config` (recorded with the results).

    Its options are those of envfarm/bench.py's add_arguments.
    """
    return shlex.join(
        [
            "envfarm",
            "bench",
            "--envs",
            ",".join(config.envs),
            "--num-envs",
            ",".join(map(str, config.num_envs)),
            "--backends",
            ",".join(config.backends),
            "--repeats",
            str(config.repeats),
            "--steps",
            str(config.steps),
            "--seconds",
            f"{config.seconds:g}",
            "--synthetic-step-us",
            f"{config.synthetic_step_us:g}",
            "--synthetic-obs",
            "x".join(map(str, config.synthetic_obs)),
            "--loops",
            ",".join(config.loops),
        ]
    )
