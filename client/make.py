"""`envfarm.make_vec`: the counterpart of `gymnasium.make_vec` for a farm of workers."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec

from envfarm.client.farm import Farm, check_on_failure
from envfarm.client.vector_env import FarmVectorEnv


class _EnvMaker:
    """Builds one env in a worker; a class rather than a closure so that it pickles small."""

    def __init__(self, spec: EnvSpec, kwargs: dict[str, Any], wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]]):
        self.spec, self.kwargs, self.wrappers = spec, kwargs, list(wrappers)

    def __call__(self) -> gym.Env:
        env = gym.make(self.spec, **self.kwargs)
        for wrapper in self.wrappers:
            env = wrapper(env)
        return env


def make_vec(
    env_id: str | EnvSpec,
    num_envs: int = 1,
    *,
    env_kwargs: dict[str, Any] | None = None,
    wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]] | None = None,
    broker: str | None = None,
    listen: str | None = None,
    curve: tuple[str, str] | None = None,
    on_failure: str = "raise",
    **vector_kwargs: Any,
) -> FarmVectorEnv:
    """Creates a FarmVectorEnv of `num_envs` copies of a registered env, like `gymnasium.make_vec`.

    Args:
        env_id: A registered env id (optionally "module:Env-v0") or an EnvSpec.
        num_envs: How many envs.
        env_kwargs: Keyword arguments for each env's constructor (`gymnasium.make(env_id, **env_kwargs)`).
        wrappers: Wrapper constructors applied to each env, in order.
        broker: A farm broker's endpoint (e.g. "tcp://head:5555"): lease workers there instead of
            starting local ones; they build `env_id` with `env_kwargs` (they take no code).
        listen, curve, on_failure: The farm's options, see `envfarm.Farm` (client/farm.py); listen,
            curve and on_failure="restart" need a broker (ValueError without one).
        **vector_kwargs: Passed to FarmVectorEnv (shared_memory, copy, context, num_workers, ...).

    Raises:
        gymnasium.error.Error: If `env_id` is not registered (raised here, before any worker starts).
        ValueError: If a farm option is given without a broker, or wrappers with one.
    """
    if isinstance(env_id, EnvSpec):
        spec = env_id
    elif isinstance(env_id, str):
        spec = gym.spec(env_id)
    else:
        raise gym.error.Error(f"Invalid id type: {type(env_id)}. Expected `str` or `EnvSpec`")
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    env_kwargs = dict(env_kwargs or {})
    wrappers = list(wrappers or [])
    maker = _EnvMaker(spec, env_kwargs, wrappers)
    if broker is not None:
        if wrappers:
            raise ValueError("farm workers take no code: wrappers cannot be sent to them; wrap the vector env instead")
        farm = Farm(broker, spec.id, env_kwargs, listen=listen, curve=curve, on_failure=on_failure)
        envs = FarmVectorEnv([maker] * num_envs, farm=farm, **vector_kwargs)
    else:
        check_on_failure(on_failure, broker)
        # Silently dropped, curve would leave a user believing their links encrypted.
        given = [name for name, value in (("listen", listen), ("curve", curve)) if value is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} a farm (broker=...): "
                "without a broker the workers are local processes on this host"
            )
        envs = FarmVectorEnv([maker] * num_envs, **vector_kwargs)

    vector_spec = copy.deepcopy(spec)
    vector_spec.kwargs = {**spec.kwargs, **env_kwargs, "num_envs": num_envs, "vectorization_mode": "envfarm"}
    # What the caller asked for: the farm's options as given (those not left at their default), not the Farm.
    farm_options = {"broker": broker, "listen": listen, "curve": curve, "on_failure": on_failure}
    passed = {k: v for k, v in farm_options.items() if v not in (None, "raise")} | vector_kwargs
    if passed:
        vector_spec.kwargs["vector_kwargs"] = passed
    if wrappers:
        vector_spec.kwargs["wrappers"] = wrappers
    envs.spec = vector_spec
    return envs
