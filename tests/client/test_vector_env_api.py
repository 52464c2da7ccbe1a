"""FarmVectorEnv's API as AsyncVectorEnv users know it: errors, async calls, attributes, close."""

from __future__ import annotations

import functools
import multiprocessing
import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode
from testenvs import ScriptedEnv

import envfarm


@pytest.fixture
def envs():
    envs = envfarm.FarmVectorEnv(
        [functools.partial(ScriptedEnv, obs="dict", render_mode="rgb_array")] * 4, num_workers=2
    )
    yield envs
    envs.close()


def test_attributes_match_async(envs):
    assert envs.num_envs == 4
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert envs.metadata["render_fps"] == 30
    assert envs.render_mode == "rgb_array"
    assert envs.spec is None
    assert repr(envs) == "FarmVectorEnv(num_envs=4)"
    assert len(envs.processes) == 2 and all(p.is_alive() for p in envs.processes)


def test_make_vec_sets_spec_and_repr():
    envs = envfarm.make_vec("CartPole-v1", 3, env_kwargs={"render_mode": "rgb_array"}, num_workers=1)
    try:
        assert envs.spec.id == "CartPole-v1"
        assert envs.spec.kwargs["num_envs"] == 3
        assert envs.spec.kwargs["render_mode"] == "rgb_array"
        assert repr(envs) == "FarmVectorEnv(CartPole-v1, num_envs=3)"
        assert envs.render_mode == "rgb_array"
        assert envs.spec.kwargs["vector_kwargs"] == {"num_workers": 1}  # what the caller passed
        assert envs.farm is None
    finally:
        envs.close()


def test_farm_options_are_checked_before_any_worker_starts():
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'restart', got 'retry'"):
        envfarm.Farm("tcp://127.0.0.1:9", "CartPole-v1", on_failure="retry")
    with pytest.raises(ValueError, match="on_failure must be 'raise' or 'restart', got 'retry'"):
        envfarm.make_vec("CartPole-v1", 2, on_failure="retry")
    with pytest.raises(ValueError, match="on_failure='restart' needs a farm"):
        envfarm.make_vec("CartPole-v1", 2, on_failure="restart")
    # Without a broker the workers are local: a farm's address or keys would be silently unused.
    with pytest.raises(
        ValueError, match=r"^curve needs a farm \(broker=\.\.\.\): without a broker the workers are local"
    ):
        envfarm.make_vec("CartPole-v1", 2, curve=("trainer.key_secret", "broker.key"))
    with pytest.raises(ValueError, match=r"^listen and curve need a farm \(broker=\.\.\.\)"):
        envfarm.make_vec("CartPole-v1", 2, listen="0.0.0.0:5556", curve=("trainer.key_secret", "broker.key"))
    farm = envfarm.Farm("tcp://127.0.0.1:9", "CartPole-v1")  # nothing listens there: nothing is asked of it
    with pytest.raises(ValueError, match="pass farm or inline_worker, not both"):
        envfarm.FarmVectorEnv([ScriptedEnv] * 2, inline_worker=True, farm=farm)
    assert set(multiprocessing.active_children()) == before


def test_make_vec_applies_wrappers():
    envs = envfarm.make_vec("CartPole-v1", 2, wrappers=[gym.wrappers.RecordEpisodeStatistics], num_workers=1)
    try:
        envs.reset(seed=0)
        for _ in range(40):
            _, _, _, _, info = envs.step(envs.action_space.sample())
            if "episode" in info:
                break
        assert "episode" in info and "_episode" in info
    finally:
        envs.close()


def test_unknown_env_id_fails_before_any_worker_starts():
    before = set(multiprocessing.active_children())
    with pytest.raises(gym.error.NameNotFound, match="NoSuchEnv"):
        envfarm.make_vec("NoSuchEnv-v0", 2)
    assert set(multiprocessing.active_children()) == before


def test_env_constructor_error_is_raised_with_its_class_and_leaves_nothing():
    from testenvs import BrokenEnv

    with pytest.raises(RuntimeError, match="this env cannot be built") as info:
        envfarm.FarmVectorEnv([BrokenEnv] * 2, num_workers=2)
    assert "remote traceback" in "".join(info.value.__notes__)
    assert multiprocessing.active_children() == []


def test_seeds_int_list_and_np_random_seed(envs):
    envs.reset(seed=10)
    assert envs.np_random_seed == (10, 11, 12, 13)
    envs.reset(seed=[5, None, 7, 8])
    seeds = envs.np_random_seed
    assert seeds[0] == 5 and seeds[2:] == (7, 8)
    with pytest.raises(ValueError, match="length must match num_envs=4 but got length=2"):
        envs.reset(seed=[1, 2])
    assert all(isinstance(rng, np.random.Generator) for rng in envs.np_random)


def test_pending_call_errors_match_gymnasium(envs):
    envs.reset_async(seed=0)
    with pytest.raises(
        AlreadyPendingCallError, match="Calling `step_async` while waiting for a pending call to `reset` to complete."
    ):
        envs.step_async(np.zeros(4, dtype=np.int64))
    with pytest.raises(AlreadyPendingCallError, match="Calling `call_async` while waiting"):
        envs.call_async("render")
    with pytest.raises(AlreadyPendingCallError, match="Calling `send` while waiting for a pending call to `reset`"):
        envs.send(np.zeros(1, dtype=np.int64), [0])
    with pytest.raises(AlreadyPendingCallError, match="Calling `recv` while waiting for a pending call to `reset`"):
        envs.recv()
    with pytest.raises(NoAsyncCallError, match="Calling `step_wait` without any prior call to `step_async`."):
        envs.step_wait()
    envs.reset_wait()
    with pytest.raises(NoAsyncCallError, match="Calling `reset_wait` without any prior call to `reset_async`."):
        envs.reset_wait()
    with pytest.raises(NoAsyncCallError, match="Calling `call_wait` without any prior call to `call_async`."):
        envs.call_wait()


@pytest.mark.parametrize("terminate", [False, True])
def test_closing_with_a_call_pending_warns_as_gymnasium(terminate):
    envs = envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, obs="dict")] * 2, num_workers=2)
    envs.reset(seed=0)
    envs.step_async(np.zeros(2, dtype=np.int64))
    with pytest.warns(UserWarning, match="Calling `close` while waiting for a pending call to `step` to complete."):
        envs.close(terminate=terminate)


def test_call_get_set_attr_and_render(envs):
    envs.reset(seed=0)
    frames = envs.render()
    assert len(frames) == 4 and all(frame.shape == (4, 4, 3) for frame in frames)
    assert envs.get_attr("episode_length") == ((3, 12),) * 4
    envs.set_attr("step_sleep", 0.0)
    envs.set_attr("episode_length", [(1, 2), (2, 3), (3, 4), (4, 5)])
    assert envs.get_attr("episode_length") == ((1, 2), (2, 3), (3, 4), (4, 5))
    with pytest.raises(ValueError, match="Got `2` values for 4 environments."):
        envs.set_attr("episode_length", [1, 2])
    with pytest.raises(ValueError, match="use `step` directly instead"):
        envs.call("step", 0)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        envs.get_attr("no_such_attribute")
    assert envs.call("render")[0].dtype == np.uint8  # still usable after the error


def test_wrong_action_shape_is_a_clear_error_and_loses_nothing(envs):
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"must be an array of shape \(4,\).*got shape \(3,\)"):
        envs.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="got dtype object"):
        envs.step({"wrong": 1})
    with pytest.raises(TypeError, match=r"one row per env \(4\), got the scalar 0"):  # as SyncVectorEnv: TypeError
        envs.step(0)
    _, _, _, _, info = envs.step(np.ones(4, dtype=np.int64))  # nothing was sent: the env still works
    assert info["t"].tolist() == [1, 1, 1, 1]


def test_invalid_action_value_raises_the_env_error(envs):
    envs.reset(seed=0)
    with pytest.raises(gym.error.InvalidAction, match="is not in Discrete"):
        envs.step(np.full(4, 7, dtype=np.int64))


def test_reset_mask_validation_and_callers_options_untouched(envs):
    envs.reset(seed=0)
    envs.step(np.zeros(4, dtype=np.int64))
    options = {"reset_mask": np.array([True, False, False, True]), "level": 3}
    _, info = envs.reset(options=options)
    assert "reset_mask" in options, "the caller's options dict must not be modified"
    assert info["_start"].tolist() == [True, False, False, True]
    assert info["options_seen"][0] == ["level"]
    with pytest.raises(TypeError, match="must be a numpy array"):
        envs.reset(options={"reset_mask": [True] * 4})
    with pytest.raises(ValueError, match=r"must have shape `\(4,\)`"):
        envs.reset(options={"reset_mask": np.ones(3, bool)})
    with pytest.raises(TypeError, match="must have `dtype=np.bool_`"):
        envs.reset(options={"reset_mask": np.ones(4, int)})
    with pytest.raises(ValueError, match="at least one True value"):
        envs.reset(options={"reset_mask": np.zeros(4, bool)})


def test_closed_env_raises_and_close_is_idempotent(envs):
    envs.close()
    envs.close()
    assert envs.closed
    with pytest.raises(ClosedEnvironmentError, match="after a call to `close\\(\\)`"):
        envs.reset()
    with pytest.raises(ClosedEnvironmentError):
        envs.step(np.zeros(4, dtype=np.int64))


def test_constructor_checks():
    with pytest.raises(ValueError, match="at least one env_fn"):
        envfarm.FarmVectorEnv([])
    with pytest.raises(ValueError, match="either num_workers or envs_per_worker"):
        envfarm.FarmVectorEnv([ScriptedEnv], num_workers=1, envs_per_worker=1)
    with pytest.raises(ValueError, match="custom `worker`"):
        envfarm.FarmVectorEnv([ScriptedEnv], worker=lambda *a: None)
    with pytest.raises(ValueError, match="Invalid `observation_mode`"):
        envfarm.FarmVectorEnv([ScriptedEnv], observation_mode="bogus")
    with pytest.raises(RuntimeError, match="observation spaces are not equivalent"):
        envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, obs="box"), functools.partial(ScriptedEnv, obs="image")])
    assert multiprocessing.active_children() == []


def test_max_concurrency_bounds_the_worker_count():
    envs = envfarm.FarmVectorEnv([ScriptedEnv] * 4, max_concurrency=1)
    try:
        assert envs.num_workers == 1
    finally:
        envs.close()


def test_structured_action_with_a_missing_key_is_a_clear_error():
    envs = envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, act="dict")] * 2, num_workers=1)
    try:
        envs.reset(seed=0)
        with pytest.raises(ValueError, match="actions do not match action_space.*'force'"):
            envs.step({"move": np.zeros(2, dtype=np.int64)})
    finally:
        envs.close()


def test_inline_worker_serves_the_last_block_in_this_process():
    envs = envfarm.FarmVectorEnv(
        [functools.partial(ScriptedEnv, fail_at_step=2)] * 4, num_workers=2, inline_worker=True
    )
    try:
        assert len(envs.processes) == 1
        envs.reset(seed=0)
        envs.step(np.zeros(4, dtype=np.int64))
        with pytest.raises(ValueError, match="scripted failure") as raised:
            envs.step(np.zeros(4, dtype=np.int64))
        assert raised.value.failed_envs == [0, 1, 2, 3]
        assert "in the trainer" in "".join(raised.value.__notes__)
        envs.reset(seed=1)
        assert envs.get_attr("total_steps") == (2, 2, 2, 2)
    finally:
        envs.close()


@pytest.mark.parametrize("action", [0.7, 1.9, np.nan], ids=["0.7", "1.9", "nan"])
def test_actions_reach_the_env_as_given_with_shared_memory(action):
    # The shared action rows have the space's dtype; a value that would be cast there (0.7 -> 0)
    # travels in the message instead, so the env judges the caller's own value, as under Sync.
    actions = np.array([0, 1, action, 0])
    sync = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
    envs = envfarm.FarmVectorEnv([lambda: gym.make("CartPole-v1")] * 4, num_workers=2, shared_memory=True)
    try:
        sync.reset(seed=0)
        envs.reset(seed=0)
        with pytest.raises(Exception) as expected:
            sync.step(actions)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            envs.step(actions)
    finally:
        envs.close()
        sync.close()


@pytest.mark.parametrize("obs", [None, 0.5, np.zeros(3, np.float32)], ids=["None", "scalar", "wrong-shape"])
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_an_observation_that_does_not_fit_its_space_is_an_error_as_under_sync(obs, shared_memory):
    from testenvs import FixedObsEnv

    env_fns = [functools.partial(FixedObsEnv, np.zeros(4, np.float32)), functools.partial(FixedObsEnv, obs)]
    sync = gym.vector.SyncVectorEnv(env_fns)
    envs = envfarm.FarmVectorEnv(env_fns, num_workers=2, shared_memory=shared_memory)
    try:
        with pytest.raises(ValueError, match="all input arrays must have the same shape"):
            sync.reset(seed=0)
        with pytest.raises(
            ValueError, match=r"all input arrays must have the same shape: env 1 returned an observation of shape"
        ):
            envs.reset(seed=0)
    finally:
        envs.close()
        sync.close()


def test_torch_threads_beside_the_workers_are_warned_of_once(monkeypatch):
    import sys
    import types

    import envfarm.client.checks as checks

    torch = types.ModuleType("torch")
    torch.get_num_threads, torch.set_num_threads = (lambda: 2), (lambda n: None)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(checks, "_warned_of_oversubscription", False)
    monkeypatch.setattr(checks, "available_cpus", lambda: 2)
    with pytest.warns(
        UserWarning,
        match=r"torch uses 2 threads in this process beside 2 worker processes on 2 CPUs.*torch.set_num_threads\(1\)",
    ):
        envfarm.make_vec("CartPole-v1", 2, num_workers=2).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envfarm.make_vec("CartPole-v1", 2, num_workers=2).close()  # once
