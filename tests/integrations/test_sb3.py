"""envfarm.integrations.sb3: an SB3 VecEnv over envfarm that steps exactly as SB3's DummyVecEnv,
locally and on a farm, and that SB3's own checker, wrappers and PPO accept."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

import testenvs  # noqa: E402,F401  (registers envfarm-tests/Scripted-v0)
import torch  # noqa: E402  (stable_baselines3 brings it)
from compare import assert_same  # noqa: E402
from farms import start_farm  # noqa: E402
from gymnasium.wrappers import FilterObservation, TimeLimit  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_checker import check_env  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, VecNormalize  # noqa: E402

from envfarm.integrations.sb3 import EnvfarmVecEnv, make_vec_env  # noqa: E402

SCRIPTED = "envfarm-tests/Scripted-v0"  # random episode ends and truncations, infos of many types
# A Dict observation SB3 takes (ScriptedEnv's "dict" also has a Text entry, which SB3 does not)
NUMERIC_DICT = functools.partial(FilterObservation, filter_keys=["id", "pos"])


def plain(value):
    """Numpy scalars as Python ones, recursively: Gymnasium's batched infos make an env's Python
    int an np.int64 (the adapter cannot know which it was); everything else stays strict."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


def without_times(infos):
    """Infos with the wall-clock time of episode statistics (Monitor's info["episode"]["t"]) left out."""
    infos = copy.deepcopy(list(infos))
    for info in infos:
        info.get("episode", {}).pop("t", None)
    return infos


def assert_steps_alike(theirs: VecEnv, ours: VecEnv, steps: int, *, seed: int) -> int:
    """Seeds and resets both, then steps both with the same random actions, comparing everything;
    returns how many episodes were truncated."""
    assert ours.seed(seed) == theirs.seed(seed)
    assert_same(theirs.reset(), ours.reset(), "reset")
    assert_same(plain(theirs.reset_infos), plain(ours.reset_infos), "reset_infos")
    actions = copy.deepcopy(theirs.action_space)
    actions.seed(seed)
    ends = truncations = 0
    for step in range(steps):
        action = np.stack([actions.sample() for _ in range(theirs.num_envs)])
        expected, actual = theirs.step(action), ours.step(action)
        for name, e, a in zip(("obs", "rewards", "dones"), expected, actual):
            assert_same(e, a, f"step {step}: {name}")
        assert_same(plain(without_times(expected[3])), plain(without_times(actual[3])), f"step {step}: infos")
        assert_same(plain(theirs.reset_infos), plain(ours.reset_infos), f"step {step}: reset_infos")
        ends += int(expected[2].sum())
        truncations += sum(info["TimeLimit.truncated"] for info in expected[3])
    assert ends > 0, "no episode ended: the comparison did not cross an autoreset"
    return truncations


@pytest.fixture
def closing():
    """Closes every vector env the test made, even when it fails."""
    made = []
    yield lambda venv: made.append(venv) or venv
    for venv in made:
        venv.close()


# ----------------------------------------------------------------- SB3's own checks


class FirstEnv(gym.Env):
    """Env 0 of a VecEnv as a gymnasium.Env, so that SB3's check_env inspects what the adapter returns."""

    def __init__(self, venv: VecEnv):
        self.venv = venv
        self.observation_space, self.action_space = venv.observation_space, venv.action_space

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.venv.seed(seed)
        if options:
            self.venv.set_options(options)
        return self._first(self.venv.reset()), self.venv.reset_infos[0]

    def step(self, action):
        obs, rewards, dones, infos = self.venv.step(np.stack([action] * self.venv.num_envs))
        info = infos[0]
        truncated = info["TimeLimit.truncated"]
        obs = info["terminal_observation"] if dones[0] else self._first(obs)
        return obs, rewards[0].item(), bool(dones[0]) and not truncated, truncated, info

    def _first(self, obs):
        return {key: value[0] for key, value in obs.items()} if isinstance(obs, dict) else obs[0]


@pytest.mark.parametrize("env", ["CartPole-v1", "dict"])
def test_sb3_check_env_accepts_what_the_adapter_returns(env, closing):
    if env == "dict":
        venv = closing(EnvfarmVecEnv(SCRIPTED, 2, env_kwargs={"obs": "dict"}, wrappers=[NUMERIC_DICT], num_workers=2))
    else:
        venv = closing(make_vec_env(env, 2, seed=0, num_workers=2))
    check_env(FirstEnv(venv))  # raises on what SB3 cannot use; warns (CartPole's unbounded Box) on what it can


# ----------------------------------------------------------------- step for step as DummyVecEnv


def test_cartpole_steps_as_sb3_make_vec_env(closing):
    ours = closing(make_vec_env("CartPole-v1", 4, seed=3, num_workers=2))
    theirs = closing(sb3_make_vec_env("CartPole-v1", 4, seed=3))
    assert (ours.observation_space, ours.action_space, ours.num_envs) == (
        theirs.observation_space,
        theirs.action_space,
        4,
    )
    assert ours.render_mode == theirs.render_mode == "rgb_array"
    assert [ours.action_space.sample() for _ in range(20)] == [theirs.action_space.sample() for _ in range(20)]
    assert_steps_alike(theirs, ours, 300, seed=3)
    assert ours.env_is_wrapped(Monitor) == theirs.env_is_wrapped(Monitor) == [True] * 4
    assert_same(theirs.render(), ours.render())


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "wire"])
def test_dict_observations_and_rich_infos_step_as_dummy_vec_env(shared_memory, closing):
    ours = closing(
        EnvfarmVecEnv(
            SCRIPTED, 3, env_kwargs={"obs": "dict"}, wrappers=[NUMERIC_DICT], num_workers=2, shared_memory=shared_memory
        )
    )
    theirs = closing(DummyVecEnv([lambda: NUMERIC_DICT(gym.make(SCRIPTED, obs="dict"))] * 3))
    assert ours.observation_space == theirs.observation_space
    truncations = assert_steps_alike(theirs, ours, 150, seed=11)
    assert truncations > 0, "no episode was truncated: TimeLimit.truncated=True was not compared"
    # options as SB3 passes them: only to envs that have some, each env its own
    for options in ({"level": 2}, [{"a": 1}, {}, {"b": 2, "c": 3}]):
        ours.set_options(options)
        theirs.set_options(options)
        assert_same(theirs.reset(), ours.reset(), f"reset with {options}")
        assert_same(plain(theirs.reset_infos), plain(ours.reset_infos), f"reset_infos with {options}")
        assert ours.reset_infos[0]["options_seen"] == sorted(options if isinstance(options, dict) else options[0])


def test_seed_is_used_by_the_next_reset_only(closing):
    venv = closing(EnvfarmVecEnv("CartPole-v1", 3, num_workers=1))
    assert venv.seed(5) == [5, 6, 7]
    first = venv.reset()
    assert_same(np.stack([gym.make("CartPole-v1").reset(seed=s)[0] for s in (5, 6, 7)]), first)
    again = venv.reset()
    assert not np.array_equal(first, again)
    venv.seed(5)
    assert_same(first, venv.reset())
    seeds = venv.seed()  # random, but consecutive as SB3's
    assert seeds == list(range(seeds[0], seeds[0] + 3))


# ----------------------------------------------------------------- env_method, get_attr, set_attr


def test_env_method_get_attr_set_attr_with_indices_as_dummy_vec_env(closing):
    ours = closing(EnvfarmVecEnv(SCRIPTED, 3, num_workers=2))
    theirs = closing(DummyVecEnv([lambda: gym.make(SCRIPTED)] * 3))

    def same(operation):
        assert_same(plain(operation(theirs)), plain(operation(ours)))

    for venv in (ours, theirs):
        venv.seed(0)
        venv.reset()
        for _ in range(2):
            venv.step(np.zeros(3, np.int64))
    same(lambda venv: venv.get_attr("t"))
    same(lambda venv: venv.get_attr("t", indices=[2, 0]))
    same(lambda venv: venv.get_attr("episode_length", indices=-1))
    same(lambda venv: venv.env_method("reset", seed=5, indices=[1]))  # only env 1 is reset...
    same(lambda venv: venv.get_attr("t"))  # ...as these show
    same(lambda venv: venv.env_method("render", indices=2))
    same(lambda venv: venv.env_method("get_wrapper_attr", "length"))
    same(lambda venv: venv.set_attr("marker", [1, 2], indices=[0, 2]))  # one value (a list) for envs 0 and 2
    same(lambda venv: venv.get_attr("marker", indices=[0, 2]))
    same(lambda venv: (venv.has_attr("marker"), venv.has_attr("episode_length")))
    # SB3 sets on the outermost wrapper, so the env beneath keeps its own episode_length
    same(lambda venv: venv.set_attr("episode_length", (2, 3), indices=1))
    same(lambda venv: venv.env_method("reset", seed=9))
    same(lambda venv: (venv.get_attr("episode_length"), venv.env_method("get_wrapper_attr", "length")))
    same(lambda venv: venv.env_is_wrapped(TimeLimit))
    same(lambda venv: venv.env_is_wrapped(Monitor, indices=[0]))
    for venv in (ours, theirs):
        with pytest.raises(AttributeError):
            venv.get_attr("no_such_attribute", indices=[1])
        with pytest.raises(IndexError):
            venv.get_attr("t", indices=[3])


def test_errors_are_clear_and_close_leaves_nothing(closing):
    with pytest.raises(ValueError, match="autoreset_mode must be SAME_STEP"):
        EnvfarmVecEnv("CartPole-v1", 2, autoreset_mode="NextStep")
    venv = closing(EnvfarmVecEnv(SCRIPTED, 2, env_kwargs={"fail_at_step": 2}, num_workers=1))
    venv.reset()
    venv.step(np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="scripted failure at step 2"):  # the env's own exception
        venv.step(np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        venv.step(np.zeros(3, np.int64))
    with pytest.warns(UserWarning, match="render mode is None"):  # as SB3's own VecEnvs
        assert venv.get_images() == [None, None]
    processes = venv.farm.processes
    venv.close()
    venv.close()  # twice is fine, as SubprocVecEnv
    assert venv.farm.closed and not any(process.is_alive() for process in processes)
    with pytest.raises(gym.error.ClosedEnvironmentError):
        venv.reset()


def test_make_vec_env_falls_back_to_no_render_mode(closing):
    gym.register("envfarm-tests/NoRenderMode-v0", entry_point="testenvs:CounterEnv")
    try:
        venv = closing(make_vec_env("envfarm-tests/NoRenderMode-v0", 2, seed=0, num_workers=1))
        assert venv.render_mode is None
        assert_same(np.zeros((2, 1)), venv.reset())
    finally:
        del gym.registry["envfarm-tests/NoRenderMode-v0"]


# ----------------------------------------------------------------- SB3's VecEnv wrappers on top


def test_vec_normalize_over_vec_monitor_as_over_dummy_vec_env(closing):
    ours = closing(VecNormalize(VecMonitor(EnvfarmVecEnv("CartPole-v1", 4, num_workers=2)), gamma=0.9))
    theirs = closing(VecNormalize(VecMonitor(DummyVecEnv([lambda: gym.make("CartPole-v1")] * 4)), gamma=0.9))
    assert_steps_alike(theirs, ours, 200, seed=1)
    assert_same(theirs.obs_rms.mean, ours.obs_rms.mean)
    assert_same(theirs.ret_rms.var, ours.ret_rms.var)
    assert ours.env_method("get_wrapper_attr", "render_mode", indices=[0]) == [None]  # through the wrappers


# ----------------------------------------------------------------- a farm


def test_farm_steps_as_sb3_make_vec_env(closing):
    # the vector env closes before the farm goes
    with (
        start_farm(1, 4) as (broker, _),
        contextlib.closing(make_vec_env("CartPole-v1", 4, seed=2, broker=broker.endpoint)) as ours,
    ):
        theirs = closing(sb3_make_vec_env("CartPole-v1", 4, seed=2))
        assert isinstance(ours, VecMonitor) and ours.unwrapped.is_farm  # farm envs take no Monitor
        assert_steps_alike(theirs, ours, 200, seed=2)
        assert ours.get_attr("render_mode", indices=[2]) == ["rgb_array"]
        assert ours.env_is_wrapped(TimeLimit) == [True] * 4
        assert ours.env_is_wrapped(Monitor, indices=[1, 3]) == [False] * 2
        assert_same(theirs.render(), ours.render())
        with pytest.raises(
            NotImplementedError, match=r"env_method on envs \[0\] of 4: a farm's envs can only be called all at once"
        ):
            ours.env_method("render", indices=[0])
        with pytest.raises(NotImplementedError, match="set_attr on envs"):
            ours.set_attr("marker", 1, indices=[0, 1])
        ours.set_attr("marker", [1, 2])
        assert ours.get_attr("marker") == [[1, 2]] * 4
        with pytest.raises(ValueError, match="wrappers cannot be sent"):
            make_vec_env("CartPole-v1", 2, broker=broker.endpoint, wrappers=[TimeLimit])
        ours.close()
        assert ours.unwrapped.farm.closed


def test_farm_restart_ends_the_episode_without_a_terminal_observation():
    with (
        start_farm(2, 2) as (broker, _),
        contextlib.closing(
            make_vec_env("CartPole-v1", 2, seed=0, broker=broker.endpoint, on_failure="restart", shared_memory=False)
        ) as venv,
    ):
        venv.reset()
        os.kill(venv.unwrapped.farm._workers[0].pid, signal.SIGKILL)  # its two envs are rebuilt on the spare worker
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, _, dones, infos = venv.step(np.zeros(2, np.int64))
            if "envfarm_restarted" in infos[0]:
                break
        else:
            pytest.fail("the lost worker's envs were not restarted")
        assert dones.all()
        for info in infos:
            assert info["TimeLimit.truncated"] and info["envfarm_restarted"] and "terminal_observation" not in info
        venv.step(np.zeros(2, np.int64))  # and it goes on


# ----------------------------------------------------------------- SB3's PPO learns through it


def test_ppo_learns_cartpole(closing):
    # Random actions average about 22 on CartPole-v1. rl-zoo's CartPole hyperparameters reach 500
    # within 50k steps (seeds 0-4 measured here: all at 500 by 50k steps, in 20-30 s on 2 CPUs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside a worker process on 2 CPUs: more threads would take its core
    try:
        venv = closing(make_vec_env("CartPole-v1", 8, seed=0, num_workers=1))
        model = PPO(
            "MlpPolicy",
            venv,
            seed=0,
            n_steps=32,
            batch_size=256,
            gae_lambda=0.8,
            gamma=0.98,
            n_epochs=20,
            ent_coef=0.0,
            learning_rate=1e-3,
            device="cpu",
        )
        model.learn(50_000)
        mean_return, _ = evaluate_policy(model, venv, n_eval_episodes=10, deterministic=True)
    finally:
        torch.set_num_threads(threads)
    assert mean_return >= 150, f"PPO did not learn CartPole through the adapter: mean return {mean_return}"
