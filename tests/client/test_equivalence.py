"""Step-for-step equivalence with gymnasium.vector.SyncVectorEnv: same seeds, same actions,
identical observations, rewards, terminations, truncations and infos."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
from compare import assert_same
from gymnasium.vector import AutoresetMode
from testenvs import OBSERVATION_SPACES, ScriptedEnv

import envfarm

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


def run_side_by_side(env_fns, steps: int, mode: AutoresetMode, **farm_kwargs) -> None:
    sync = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=mode)
    farm = envfarm.FarmVectorEnv(env_fns, autoreset_mode=mode, **farm_kwargs)
    try:
        assert farm.single_observation_space == sync.single_observation_space
        assert farm.observation_space == sync.observation_space
        assert farm.single_action_space == sync.single_action_space
        assert farm.action_space == sync.action_space
        assert farm.metadata == sync.metadata
        assert farm.render_mode == sync.render_mode

        rng = np.random.default_rng(7)
        farm.action_space.seed(11)
        assert_same(sync.reset(seed=123), farm.reset(seed=123), "reset")
        for step in range(steps):
            actions = farm.action_space.sample()
            expected = sync.step(actions)
            assert_same(expected, farm.step(actions), f"step {step}")
            ended = expected[2] | expected[3]
            if mode == AutoresetMode.DISABLED and ended.any():
                seeds = [int(s) for s in rng.integers(1000, size=len(env_fns))]
                options = {"reset_mask": ended}
                assert_same(
                    sync.reset(seed=seeds, options=dict(options)),
                    farm.reset(seed=seeds, options=dict(options)),
                    f"reset after {step}",
                )
        assert_same(sync.get_attr("np_random_seed"), farm.get_attr("np_random_seed"), "np_random_seed")
    finally:
        farm.close()
        sync.close()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_cartpole_matches_sync(mode, shared_memory):
    env_fns = [lambda: gym.make("CartPole-v1")] * 6
    run_side_by_side(env_fns, 300, mode, shared_memory=shared_memory, num_workers=2, context="fork")


@pytest.mark.parametrize("space", sorted(OBSERVATION_SPACES))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_every_space_matches_sync(space, mode, shared_memory):
    env_fns = [functools.partial(ScriptedEnv, obs=space)] * 5
    run_side_by_side(env_fns, 120, mode, shared_memory=shared_memory, num_workers=2, context="fork")


@pytest.mark.parametrize("act", ["box", "dict"])
def test_structured_actions_reach_the_right_env(act):
    env_fns = [functools.partial(ScriptedEnv, obs="tuple", act=act)] * 4
    run_side_by_side(env_fns, 60, AutoresetMode.NEXT_STEP, num_workers=3, context="fork")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
@pytest.mark.parametrize("space", ["dict", "image"])
def test_spawn_matches_sync(space, mode, shared_memory):
    env_fns = [functools.partial(ScriptedEnv, obs=space)] * 4
    run_side_by_side(env_fns, 100, mode, shared_memory=shared_memory, num_workers=2, context="spawn")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
@pytest.mark.parametrize("space", ["dict", "text"])
def test_inline_worker_matches_sync(space, mode, shared_memory):
    env_fns = [functools.partial(ScriptedEnv, obs=space)] * 5
    run_side_by_side(env_fns, 100, mode, shared_memory=shared_memory, num_workers=2, inline_worker=True)


def test_uneven_workers_and_one_env_per_worker():
    env_fns = [functools.partial(ScriptedEnv, obs="dict")] * 5
    run_side_by_side(env_fns, 80, AutoresetMode.NEXT_STEP, envs_per_worker=1, context="fork")
    run_side_by_side(env_fns, 80, AutoresetMode.SAME_STEP, num_workers=2, context="fork")


def test_copy_false_returns_views_that_the_next_step_overwrites():
    env_fns = [functools.partial(ScriptedEnv, obs="box")] * 4
    sync = gym.vector.SyncVectorEnv(env_fns, copy=False)
    farm = envfarm.FarmVectorEnv(env_fns, copy=False, num_workers=2)
    try:
        first_sync, _ = sync.reset(seed=1)
        first_farm, _ = farm.reset(seed=1)
        kept = first_farm.copy()
        actions = np.zeros(4, dtype=np.int64)
        sync.step(actions)
        farm.step(actions)
        assert_same(first_sync, first_farm)  # both views now hold the step's observations
        assert not np.array_equal(kept, first_farm)
    finally:
        farm.close()
        sync.close()
