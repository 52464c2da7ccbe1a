"""A farm on loopback under on_failure="restart": a lost worker's envs are rebuilt on a spare,
reported as Gymnasium reports an end, and the lost worker never writes into its replacement's rows."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest
from compare import assert_same
from farms import start_farm

import envfarm


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "freeze"])
def test_restart_policy_rebuilds_lost_envs_on_a_spare_worker(farm, fault):
    # farm: three 4-slot workers; the trainer leases two, the third is the spare. A killed
    # worker's connection drops (the next send finds it gone); a frozen one goes silent.
    envs = envfarm.make_vec("CartPole-v1", 8, broker=farm.endpoint, on_failure="restart", shared_memory=False)
    try:
        envs.reset(seed=0)
        victim = envs._workers[1]
        os.kill(victim.pid, fault)
        time.sleep(0.5)
        restarted = None
        deadline = time.monotonic() + 20
        while restarted is None and time.monotonic() < deadline:
            _, _, _, truncated, info = envs.step(envs.action_space.sample())
            if "envfarm_restarted" in info:
                restarted = (truncated, info)
        assert restarted is not None, "the lost worker's envs were not restarted"
        truncated, info = restarted
        assert info["_envfarm_restarted"].tolist() == [False] * 4 + [True] * 4
        assert truncated[4:].all()
        assert envs._workers[1].pid != victim.pid
        # NEXT_STEP: the step after an end is Gymnasium's autoreset step: a reset, reward 0, no end
        obs, rewards, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert rewards[4:].tolist() == [0.0] * 4 and not terminated[4:].any() and not truncated[4:].any()
        rewards = envs.step(envs.action_space.sample())[1]
        assert rewards[4:].tolist() == [1.0] * 4  # and then it steps as any env
        for _ in range(20):  # training goes on
            envs.step(envs.action_space.sample())
        with pytest.raises(ValueError, match="needs a farm"):
            envfarm.make_vec("CartPole-v1", 2, on_failure="restart")
    finally:
        envs.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_a_restart_under_same_step_gives_every_truncated_env_a_final_obs(farm, shared_memory):
    # Under SAME_STEP a learner bootstraps from info["final_obs"][i] for every truncated env i;
    # a restarted env is truncated too, so it must have one (before, a KeyError in the learner).
    envs = envfarm.make_vec(
        "CartPole-v1",
        8,
        broker=farm.endpoint,
        on_failure="restart",
        shared_memory=shared_memory,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    try:
        envs.reset(seed=0)
        victim = envs._workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        info: dict = {}
        while "envfarm_restarted" not in info and time.monotonic() < deadline:
            obs, _, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert "envfarm_restarted" in info, "the lost worker's envs were not restarted"
        ended = np.flatnonzero(terminated | truncated)
        assert set(range(4, 8)) <= set(ended.tolist())
        assert info["_final_obs"][ended].all() and info["_final_info"][ended].all()
        for i in range(4, 8):
            assert info["final_obs"][i].shape == envs.single_observation_space.shape
            np.testing.assert_array_equal(info["final_obs"][i], obs[i])  # the new episode's first
        for _ in range(20):  # training goes on
            envs.step(envs.action_space.sample())
    finally:
        envs.close()


def test_a_worker_given_up_for_lost_never_writes_into_its_replacements_rows():
    # A same-host worker frozen past dead_after is given up for lost and its envs rebuilt on the
    # spare; when it wakes up it finishes the step it was sent and writes its results into the
    # segment it mapped. Those rows must not be the replacement's: every observation returned
    # stays the one its env holds, and the other envs stay step for step equal to SyncVectorEnv.
    with start_farm(3, 2, dead_after=2.5) as (broker, _):
        envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, on_failure="restart", copy=False)
        sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
        rng = np.random.default_rng(0)

        def step_both() -> tuple:
            actions = rng.integers(0, 2, 4)
            ours, theirs = envs.step(actions), sync.step(actions)
            assert_same(
                tuple(part[:2] for part in theirs[:4]), tuple(part[:2] for part in ours[:4])
            )  # envs 0-1: as Sync
            return ours

        def assert_obs_are_the_envs_own(obs: np.ndarray) -> None:
            states = np.array(envs.get_attr("state"), np.float32)
            np.testing.assert_array_equal(obs, states)

        try:
            assert all(worker.shared_memory for worker in envs._workers)
            assert_same(
                tuple(part[:2] for part in sync.reset(seed=0)[:1]), tuple(part[:2] for part in envs.reset(seed=0)[:1])
            )
            for _ in range(5):
                step_both()
            victim = envs._workers[1]
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                obs, _, _, truncated, info = step_both()  # waits dead_after, then restarts envs 2-3 on the spare
                assert truncated[2:].all() and info["_envfarm_restarted"].tolist() == [False, False, True, True]
                assert envs._workers[1].pid != victim.pid
                kept = obs.copy()
            finally:
                os.kill(victim.pid, signal.SIGCONT)  # it wakes up and finishes the step it was sent
            time.sleep(1.5)
            np.testing.assert_array_equal(obs, kept)  # a view of the batch buffer (copy=False): untouched
            assert_obs_are_the_envs_own(obs)
            for _ in range(10):
                obs = step_both()[0]
                assert_obs_are_the_envs_own(obs)
        finally:
            envs.close()
            sync.close()


def test_restart_without_capacity_is_a_clear_error(quick_farm):
    broker, processes = quick_farm  # two 2-slot workers, both leased below
    envs = envfarm.make_vec("CartPole-v1", 4, broker=broker.endpoint, on_failure="restart", shared_memory=False)
    try:
        envs.reset(seed=0)
        processes[0].kill()
        time.sleep(0.5)  # its connection is gone: the next send finds out
        with pytest.raises(
            envfarm.WorkerDiedError,
            match=r"no capacity left to restart it: the farm has no free worker with 2 slots for 'CartPole-v1' \(free: \[\]\)",
        ):
            for _ in range(1000):
                envs.step(envs.action_space.sample())
    finally:
        envs.close()


def test_a_restart_the_broker_does_not_answer_is_a_clear_error(quick_farm, monkeypatch):
    # The broker gone quiet while a worker is lost: the restart fails saying so, as a lost worker,
    # not as a timeout of the step the user did not give one.
    broker, processes = quick_farm  # two 2-slot workers: one leased below, one spare
    envs = envfarm.make_vec("CartPole-v1", 2, broker=broker.endpoint, on_failure="restart", shared_memory=False)
    try:
        envs.reset(seed=0)

        def silent_broker(fields, timeout):
            raise multiprocessing.TimeoutError(f"no reply from the broker within {timeout:g} s")

        monkeypatch.setattr(envs._pool.broker, "lease", silent_broker)
        [leased] = [process for process in processes if process.pid == envs._workers[0].pid]
        leased.kill()
        with pytest.raises(
            envfarm.WorkerDiedError, match=r"restarting it failed: no reply from the broker at .* within"
        ):
            for _ in range(1000):
                envs.step(envs.action_space.sample())
    finally:
        envs.close()
