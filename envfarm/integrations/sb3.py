"""A Stable-Baselines3 VecEnv backed by envfarm: local worker processes, or a farm.

    from stable_baselines3 import PPO
    from envfarm.integrations.sb3 import make_vec_env

    if __name__ == "__main__":
        venv = make_vec_env("CartPole-v1", n_envs=8, seed=0)  # or broker="tcp://head:5555"
        PPO("MlpPolicy", venv, seed=0).learn(50_000)
        venv.close()

`EnvfarmVecEnv` behaves as SB3's SubprocVecEnv / DummyVecEnv: done = terminated or truncated, the
env is reset in the same step, infos[i]["terminal_observation"] holds the episode's last
observation, infos[i]["TimeLimit.truncated"] says it was cut short, reset infos are in
`reset_infos`, and seeds set by `seed()` are used by the next `reset()` only.

Local envs get an outermost wrapper, `_Hooks`, which lets `env_method`, `get_attr`, `set_attr`
and `env_is_wrapped` reach only the envs they target, with SB3's semantics. Farm workers take no
code, so on a farm:

- `env_method` and `set_attr` act on all envs or raise NotImplementedError (envfarm calls every
  env at once; running a method on envs that were not asked for could change them);
- `get_attr` reads every env and keeps the targeted ones, and, as Gymnasium's `get_attr` does,
  calls the attribute if it is callable;
- `set_attr` sets as Gymnasium's `set_wrapper_attr` does (on the wrapper or env that has the
  attribute), where SB3 sets it on the outermost wrapper;
- `env_is_wrapped` matches wrapper classes by name, in Gymnasium's `str(env)`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

import envfarm

__all__ = ["EnvfarmVecEnv", "make_vec_env"]


class _Hooks(gym.Wrapper):
    """Outermost wrapper of each local env: envfarm calls every env, so each one runs an SB3
    operation only when its own index is targeted, on the env beneath as SB3 would."""

    _envfarm_sb3_index = -1  # a class attribute, so that set_wrapper_attr sets it here, not below

    def _envfarm_sb3(self, targets: frozenset[int], op: str, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._envfarm_sb3_index not in targets:
            return None
        if op == "env_method":
            return self.env.get_wrapper_attr(name)(*args, **kwargs)
        if op == "get_attr":
            return self.env.get_wrapper_attr(name)
        if op == "has_attr":
            try:
                self.env.get_wrapper_attr(name)
                return True
            except AttributeError:
                return False
        if op == "set_attr":
            return setattr(self.env, name, args[0])
        env = self.env  # "is_wrapped", as stable_baselines3.common.env_util.is_wrapped
        while isinstance(env, gym.Wrapper):
            if isinstance(env, args[0]):
                return True
            env = env.env
        return False


class EnvfarmVecEnv(VecEnv):
    """An SB3 VecEnv over `envfarm.make_vec(env_id, num_envs, **make_vec_kwargs)`.

    Args:
        env_id: A registered env id (on a farm, one its workers allow).
        num_envs: How many envs.
        env_kwargs: Keyword arguments for each env's `gymnasium.make`.
        wrappers: Gymnasium wrapper constructors applied to each env, in order (local only).
        **make_vec_kwargs: Passed to `envfarm.make_vec`: num_workers, broker, on_failure, ...

    Attributes:
        farm: The `envfarm.FarmVectorEnv` underneath (autoreset_mode SAME_STEP).

    Raises:
        ValueError: For an autoreset_mode other than SAME_STEP, wrappers on a farm, and whatever
            `envfarm.make_vec` refuses.
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        *,
        env_kwargs: dict[str, Any] | None = None,
        wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]] | None = None,
        **make_vec_kwargs: Any,
    ) -> None:
        mode = AutoresetMode(make_vec_kwargs.pop("autoreset_mode", AutoresetMode.SAME_STEP))
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3 resets an env in the step that ends its episode: autoreset_mode must be SAME_STEP, got {mode.value}"
            )
        self.is_farm = make_vec_kwargs.get("broker") is not None
        if not self.is_farm:
            wrappers = [*(wrappers or []), _Hooks]
        self.farm = envfarm.make_vec(
            env_id, num_envs, env_kwargs=env_kwargs, wrappers=wrappers, autoreset_mode=mode, **make_vec_kwargs
        )
        try:
            if not self.is_farm:
                self.farm.set_attr("_envfarm_sb3_index", list(range(num_envs)))
            super().__init__(num_envs, self.farm.single_observation_space, self.farm.single_action_space)
        except BaseException:
            self.farm.close()
            raise

    def reset(self) -> VecEnvObs:
        # SB3 passes `options` only to envs that have some, and each env may have its own: one
        # reset per distinct options (set_options(dict) gives every env the same object).
        groups: dict[int | None, list[int]] = {}
        for i, options in enumerate(self._options):
            groups.setdefault(id(options) if options else None, []).append(i)
        for targets in groups.values():
            options = self._options[targets[0]] or None
            if len(groups) > 1:
                mask = np.zeros(self.num_envs, np.bool_)
                mask[targets] = True
                options = {**(options or {}), "reset_mask": mask}
            obs, batched_infos = self.farm.reset(seed=list(self._seeds), options=options)
            infos = _unbatch(batched_infos, self.num_envs)
            for i in targets:
                self.reset_infos[i] = infos[i]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self.farm.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, batched_infos = self.farm.step_wait()
        dones = terminated | truncated
        infos = _unbatch(batched_infos, self.num_envs)
        for i in np.flatnonzero(dones):
            # SAME_STEP's info for an env that ended is its reset's info, the step's nested in it
            reset_info = infos[i]
            final_obs = reset_info.pop("final_obs", None)
            final_info = reset_info.pop("final_info", {})
            if reset_info.get("envfarm_restarted"):
                # envfarm rebuilt this env after its worker died (on_failure="restart"), so its
                # last observation is lost (final_obs is the new episode's first); SB3 bootstraps
                # only from a terminal_observation given
                infos[i] = {**reset_info, "TimeLimit.truncated": True}
            else:
                infos[i] = final_info
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                infos[i]["terminal_observation"] = final_obs
            self.reset_infos[i] = reset_info
        for i in np.flatnonzero(~dones):
            infos[i]["TimeLimit.truncated"] = False
        return obs, rewards.astype(np.float32), dones, infos  # float32 rewards, as DummyVecEnv

    def close(self) -> None:
        self.farm.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            warnings.warn(
                f"The render mode is {self.render_mode}, but this method assumes it is `rgb_array` to obtain images.",
                stacklevel=2,
            )
            return [None for _ in range(self.num_envs)]
        return list(self.farm.render())

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if self.is_farm:
            values = self.farm.get_attr(attr_name)
            return [values[i] for i in self._targets(indices)]
        return self._hook("get_attr", indices, attr_name)

    def has_attr(self, attr_name: str) -> bool:
        if self.is_farm:
            return super().has_attr(attr_name)
        return all(self._hook("has_attr", None, attr_name))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if self.is_farm:
            self._all_on_farm("set_attr", indices)
            self.farm.set_attr(attr_name, [value] * self.num_envs)  # a list would be read as one value per env
        else:
            self._hook("set_attr", indices, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        if self.is_farm:
            values = self.farm.call(method_name, *method_args, **method_kwargs)
            return [values[i] for i in self._all_on_farm("env_method", indices)]
        return self._hook("env_method", indices, method_name, *method_args, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        if self.is_farm:
            # Farm envs cannot run our code, but Gymnasium's str(wrapper) names each layer:
            # "<TimeLimit<OrderEnforcing<...<CartPoleEnv<CartPole-v1>>...>".
            chains = self.farm.call("__str__")
            return [wrapper_class.__name__ in _layer_names(chains[i]) for i in self._targets(indices)]
        return self._hook("is_wrapped", indices, "", wrapper_class)

    def _targets(self, indices: VecEnvIndices) -> list[int]:
        # range() turns negative indices into positive ones and refuses those out of range, as
        # SubprocVecEnv's list of pipes does
        envs = range(self.num_envs)
        return [envs[i] for i in self._get_indices(indices)]

    def _hook(self, op: str, indices: VecEnvIndices, name: str, *args: Any, **kwargs: Any) -> list[Any]:
        targets = self._targets(indices)
        values = self.farm.call("_envfarm_sb3", frozenset(targets), op, name, args, kwargs)
        return [values[i] for i in targets]

    def _all_on_farm(self, op: str, indices: VecEnvIndices) -> list[int]:
        targets = self._targets(indices)
        if set(targets) != set(range(self.num_envs)):
            raise NotImplementedError(
                f"{op} on envs {targets} of {self.num_envs}: a farm's envs can only be called all at once "
                "(calling the others too could change them); pass indices=None"
            )
        return targets


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    *,
    seed: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    **make_vec_kwargs: Any,
) -> VecEnv:
    """Creates `n_envs` envs served by envfarm, as SB3's `make_vec_env` does with DummyVecEnv.

    As SB3's: each env is made with render_mode="rgb_array" when it accepts one, its episodes are
    recorded by a Monitor (info["episode"]), and `seed` seeds the first reset (env i gets seed + i,
    a random seed when None) and the action space. A farm's envs cannot be wrapped there, so on a
    farm the returned env is a VecMonitor around the EnvfarmVecEnv.

    Args:
        env_id: A registered env id.
        n_envs: How many envs.
        seed: The first reset's seed.
        env_kwargs: Keyword arguments for each env's `gymnasium.make`.
        **make_vec_kwargs: Passed to EnvfarmVecEnv and `envfarm.make_vec` (num_workers, broker,
            wrappers, applied over the Monitor, ...).
    """
    env_kwargs = dict(env_kwargs or {})
    if make_vec_kwargs.get("broker") is None:
        make_vec_kwargs["wrappers"] = [Monitor, *(make_vec_kwargs.get("wrappers") or [])]
    try:
        venv = EnvfarmVecEnv(env_id, n_envs, env_kwargs={"render_mode": "rgb_array", **env_kwargs}, **make_vec_kwargs)
    except TypeError:  # the env takes no render_mode (SB3 retries the same way)
        venv = EnvfarmVecEnv(env_id, n_envs, env_kwargs=env_kwargs, **make_vec_kwargs)
    if seed is not None:
        venv.action_space.seed(seed)  # DummyVecEnv's action space is env 0's, seeded with seed + 0
    venv.seed(seed)
    return VecMonitor(venv) if venv.is_farm else venv


def _unbatch(infos: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's batched infos (per key an array over the envs and a `_key` mask of the envs
    that had it, nested dicts batched alike) as SB3's one dict per env."""
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, values in infos.items():
        mask = infos.get(f"_{key}")
        if mask is None:  # the key is itself a mask
            continue
        if isinstance(values, dict):
            values = _unbatch(values, num_envs)
        for i in np.flatnonzero(mask):
            per_env[i][key] = values[i]
    return per_env


def _layer_names(env_str: str) -> list[str]:
    """The class names in the "<Name<Name<..." chain that starts Gymnasium's str(env)."""
    chain = re.match(r"(?:<\w+(?=<))*", env_str)
    return re.findall(r"\w+", chain.group()) if chain else []
