"""The send/recv API: every env's trajectory is its sequential one, whatever order envs come back in."""

from __future__ import annotations

import functools
import multiprocessing

import gymnasium as gym
import numpy as np
import pytest
from compare import assert_same
from gymnasium.error import AlreadyPendingCallError
from testenvs import CounterEnv, ScriptedEnv

import envfarm


def assert_info_row(expected: dict, actual: dict, j: int, where: str) -> None:
    """Row 0 of a one-env batched info equals row j of a batched info."""
    for key, value in expected.items():
        if key.startswith("_"):
            continue
        assert bool(actual[f"_{key}"][j]), f"{where}: info {key!r} missing"
        if isinstance(value, dict):
            assert_info_row(value, actual[key], j, f"{where}.{key}")
        else:
            assert_same(value[0], actual[key][j], f"{where}: info {key!r}")


@pytest.mark.parametrize("inline_worker", [False, True], ids=["processes", "inline"])
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_each_env_follows_its_sequential_trajectory(shared_memory, inline_worker):
    num_envs, batch_size, seed = 6, 2, 7
    # Uneven step costs make envs come back in a varying order.
    fns = [functools.partial(ScriptedEnv, obs="box", step_sleep=0.002 * (i % 2)) for i in range(num_envs)]
    envs = envfarm.FarmVectorEnv(
        fns, num_workers=3, batch_size=batch_size, shared_memory=shared_memory, inline_worker=inline_worker
    )
    references = [gym.vector.SyncVectorEnv([fn]) for fn in fns]
    rng = np.random.default_rng(1)
    last_action: dict[int, np.ndarray] = {}
    checked, orders = 0, set()
    try:
        envs.async_reset(seed=seed)
        first = [ref.reset(seed=seed + i) for i, ref in enumerate(references)]
        for _ in range(100):
            obs, rewards, terminated, truncated, info = envs.recv(timeout=10)
            ids = info["env_id"]
            assert ids.dtype == np.int32 and len(ids) == batch_size
            orders.add(tuple(ids))
            for j, i in enumerate(ids):
                if i not in last_action:
                    assert_same(first[i][0][0], obs[j], f"reset obs of env {i}")
                    assert_info_row(first[i][1], info, j, f"reset info of env {i}")
                else:
                    ref_obs, ref_reward, ref_term, ref_trunc, ref_info = references[i].step(last_action[i])
                    assert_same(ref_obs[0], obs[j], f"obs of env {i}")
                    assert_same(ref_reward[0], rewards[j], f"reward of env {i}")
                    assert_same(ref_term[0], terminated[j], f"terminated of env {i}")
                    assert_same(ref_trunc[0], truncated[j], f"truncated of env {i}")
                    assert_info_row(ref_info, info, j, f"env {i}")
                    checked += 1
            actions = rng.integers(0, 3, size=len(ids))
            for j, i in enumerate(ids):
                last_action[i] = actions[j : j + 1]
            envs.send(actions, ids)
    finally:
        envs.close()
        for ref in references:
            ref.close()
    assert checked > 150
    assert len(orders) > 2, "envs always came back in the same order: reordering was not exercised"


def test_misuse_is_a_clear_error():
    envs = envfarm.FarmVectorEnv([ScriptedEnv] * 4, num_workers=2, batch_size=2)
    try:
        with pytest.raises(RuntimeError, match="needs 2 envs .* running or ready, but only 0"):
            envs.recv()
        envs.async_reset(seed=0)
        with pytest.raises(ValueError, match=r"envs \[0\] are still running"):
            envs.send(np.zeros(1, dtype=np.int64), [0])
        with pytest.raises(AlreadyPendingCallError, match="in flight with send/recv"):
            envs.step(np.zeros(4, dtype=np.int64))
        with pytest.raises(ValueError, match="distinct and in"):
            envs.async_reset(env_ids=[7])
        _, _, _, _, info = envs.recv()
        with pytest.raises(ValueError, match=r"must be an array of shape \(2,\)"):
            envs.send(np.zeros(3, dtype=np.int64), info["env_id"])
        envs.send(np.zeros(2, dtype=np.int64), info["env_id"])
        envs.recv()
        envs.recv()
        envs.reset(seed=0)  # all results received: the sync API works again
    finally:
        envs.close()


def test_recv_timeout_loses_nothing():
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=0.3)] * 2, num_workers=2, batch_size=2)
    try:
        envs.async_reset()
        envs.recv()
        envs.send(np.zeros(2, dtype=np.int64), [0, 1])
        with pytest.raises(multiprocessing.TimeoutError, match="`recv` has timed out"):
            envs.recv(timeout=0.05)
        obs, _, _, _, info = envs.recv(timeout=5)
        assert sorted(info["count"].tolist()) == [1, 1]
    finally:
        envs.close()


def test_env_error_in_recv_keeps_the_others_ready():
    fns = [ScriptedEnv, functools.partial(ScriptedEnv, fail_at_step=1)]
    envs = envfarm.FarmVectorEnv(fns, num_workers=2, batch_size=1)
    try:
        envs.async_reset(seed=0)
        # Two resets, then two steps, each env's in whatever order they are ready (a loaded
        # host may have env 0's step back before env 1's reset).
        resetting, outcomes = {0, 1}, {}
        for _ in range(4):
            try:
                env = int(envs.recv()[4]["env_id"][0])
            except ValueError as e:
                assert "scripted failure" in str(e) and e.failed_envs == [1]
                outcomes[1] = "error"
                continue
            if env in resetting:
                resetting.remove(env)
                envs.send(np.zeros(1, dtype=np.int64), [env])
            else:
                outcomes[env] = "stepped"
        assert outcomes == {0: "stepped", 1: "error"}
        envs.async_reset(seed=5, env_ids=[1])
        _, _, _, _, info = envs.recv()
        assert info["env_id"].tolist() == [1]
    finally:
        envs.close()
