"""Where gymnasium 1.4.0's AsyncVectorEnv is wrong, FarmVectorEnv is right."""

from __future__ import annotations

import functools
import multiprocessing
import time

import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from testenvs import CounterEnv, ScriptedEnv

import envfarm


def test_late_reply_after_timeout_is_dropped_not_returned_for_the_next_call():
    # AsyncVectorEnv: after a step_wait timeout, the next step returns the previous step's reply.
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=0.3)] * 2, num_workers=2)
    try:
        envs.reset()
        envs.step_async(np.zeros(2, dtype=np.int64))
        with pytest.raises(
            multiprocessing.TimeoutError, match="The call to `step_wait` has timed out after 0.05 second"
        ):
            envs.step_wait(timeout=0.05)
        obs, _, _, _, info = envs.step(np.zeros(2, dtype=np.int64))
        assert obs[:, 0].tolist() == [2.0, 2.0]  # this call's own result: the second step
        assert info["count"].tolist() == [2, 2]
        obs, info = envs.reset()
        assert info["count"].tolist() == [2, 2]
    finally:
        envs.close()


def test_timeout_on_reset_and_call_also_drop_late_replies():
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=0.3)] * 2, num_workers=1)
    try:
        envs.reset()
        envs.step_async(np.zeros(2, dtype=np.int64))
        with pytest.raises(multiprocessing.TimeoutError):
            envs.step_wait(timeout=0.01)
        envs.call_async("count")
        assert envs.call_wait(timeout=5) == (1, 1)
    finally:
        envs.close()


def test_steps_abandoned_in_quick_succession_never_leave_a_worker_stuck():
    # A step sent while the worker still reads the one before (abandoned by a timeout) tears the
    # worker's read. A header torn that way once read as "too large for the slot, on the socket",
    # and the worker then waited on its socket for ever: every later step timed out. Before the
    # fix, this loop left the worker stuck in 3 runs of 3.
    envs = envfarm.make_vec("CartPole-v1", 2, num_workers=1)
    try:
        envs.reset(seed=0)
        actions = np.zeros(2, dtype=np.int64)
        for _ in range(30_000):
            envs.step_async(actions)
            try:
                envs.step_wait(timeout=0)
            except multiprocessing.TimeoutError:
                pass
        envs.step_async(actions)
        envs.step_wait(timeout=30)  # answered: the worker still serves
    finally:
        envs.close()


def test_one_env_exception_leaves_the_others_running_and_a_reset_revives_it():
    # AsyncVectorEnv: the worker of the failing env exits, the vector env is unusable.
    fns = [ScriptedEnv, ScriptedEnv, functools.partial(ScriptedEnv, fail_at_step=3), ScriptedEnv]
    envs = envfarm.FarmVectorEnv(fns, num_workers=2, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        envs.reset(seed=0)
        actions = np.zeros(4, dtype=np.int64)
        envs.step(actions)
        envs.step(actions)
        with pytest.raises(ValueError, match="scripted failure at step 3") as raised:
            envs.step(actions)
        assert raised.value.failed_envs == [2]
        assert "env 2 on worker 1" in "".join(raised.value.__notes__)
        assert envs.get_attr("total_steps") == (3, 3, 3, 3)  # the other envs did step
        with pytest.raises(ResetNeeded, match="env 2 raised an exception earlier"):
            envs.step(actions)
        envs.reset(options={"reset_mask": np.array([False, False, True, False])})
        for _ in range(5):
            _, _, _, _, info = envs.step(actions)
        assert info["_t"].all()
    finally:
        envs.close()


def test_text_and_oneof_observations_update_with_shared_memory():
    # AsyncVectorEnv(shared_memory=True): Text/OneOf observations never change after reset.
    for space in ("text", "oneof", "dict"):
        envs = envfarm.FarmVectorEnv(
            [functools.partial(ScriptedEnv, obs=space, episode_length=(50, 60))] * 2, shared_memory=True
        )
        try:
            first, _ = envs.reset(seed=0)
            seen = [repr(first)] + [repr(envs.step(np.zeros(2, dtype=np.int64))[0]) for _ in range(5)]
            assert len(set(seen)) == 6, f"{space} observations did not update"
        finally:
            envs.close()


def test_disabled_autoreset_refuses_to_step_a_finished_env():
    # SyncVectorEnv raises; AsyncVectorEnv steps the finished env anyway.
    envs = envfarm.FarmVectorEnv(
        [functools.partial(ScriptedEnv, episode_length=(2, 3))] * 3,
        autoreset_mode=AutoresetMode.DISABLED,
        num_workers=2,
    )
    try:
        envs.reset(seed=0)
        actions = np.zeros(3, dtype=np.int64)
        envs.step(actions)
        _, _, terminated, truncated, _ = envs.step(actions)
        ended = terminated | truncated
        assert ended.any()
        before = envs.get_attr("total_steps")
        with pytest.raises(ResetNeeded, match=r"terminated or truncated and autoreset_mode is DISABLED"):
            envs.step(actions)
        assert envs.get_attr("total_steps") == before  # nothing was stepped
        envs.reset(options={"reset_mask": ended})
        envs.step(actions)
    finally:
        envs.close()


def test_reset_mask_is_not_popped_from_the_callers_options():
    envs = envfarm.FarmVectorEnv([ScriptedEnv] * 2, num_workers=1)
    try:
        envs.reset(seed=0)
        options = {"reset_mask": np.array([True, False])}
        envs.reset(options=options)
        envs.reset(options=options)  # the same dict works twice
        assert list(options) == ["reset_mask"]
    finally:
        envs.close()


def test_close_while_a_step_is_pending_is_bounded():
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=30)] * 2, num_workers=2)
    envs.reset()
    envs.step_async(np.zeros(2, dtype=np.int64))
    start = time.monotonic()
    envs.close(timeout=0.5)
    assert time.monotonic() - start < 3
    assert all(not p.is_alive() for p in envs.processes)
