"""The "ideal" row of `envfarm bench`: the practical limit of a two-process Python design.

The same Gymnasium envs split in two halves: one stepped by SyncVectorEnv in the trainer's own
process, the other by SyncVectorEnv in one child process, the two synchronised by busy-waited
words in shared memory, with the child's actions and observations, rewards and ends passing
through shared arrays. No messages, checks, infos, liveness or isolation: nothing envfarm could
do for a step costs less, so every envfarm figure is read against this one. It spins without
pause on both sides, which is right for this bound and wrong beside a policy that needs the CPU.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.shared_memory
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

_GO, _DONE, _STOP = 0, 1, 2  # words of the control array


class IdealPair:
    """Steps `num_envs` envs of `env_id` as two halves in two processes (the bound, not a tool)."""

    def __init__(self, env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None, seed: int = 0):
        if num_envs < 2:
            raise ValueError("the ideal pair needs at least 2 envs, one half for each process")
        self.kwargs = dict(env_kwargs or {})
        self.here = gym.make_vec(env_id, num_envs // 2, vectorization_mode="sync", **self.kwargs)
        self.num_envs, self.split = num_envs, num_envs // 2
        self.single_action_space = self.here.single_action_space
        self.single_observation_space = self.here.single_observation_space
        away = num_envs - self.split
        obs_space = batch_space(self.single_observation_space, away)
        act_space = batch_space(self.single_action_space, away)
        if not isinstance(obs_space, gym.spaces.Box) or not isinstance(
            act_space, (gym.spaces.Box, gym.spaces.MultiDiscrete)
        ):
            raise ValueError("the ideal pair takes envs with a Box observation and a Box or Discrete action")
        self._shapes = [
            ((3,), np.int64),
            (obs_space.shape, obs_space.dtype),
            (act_space.shape, act_space.dtype),
            ((away,), np.float64),
            ((away,), np.bool_),
            ((away,), np.bool_),
        ]
        self.segment = multiprocessing.shared_memory.SharedMemory(
            create=True, size=sum(_nbytes(s, d) for s, d in self._shapes)
        )
        self.control, self.obs, self.actions, self.rewards, self.terminations, self.truncations = _arrays(
            self.segment.buf, self._shapes
        )
        self.control[:] = 0
        context = multiprocessing.get_context("fork")
        self.child = context.Process(
            target=_serve,
            args=(env_id, self.kwargs, away, seed + self.split, self.segment.name, self._shapes),
            daemon=True,
        )
        self.child.start()
        self.processes = [self.child]
        self.here.reset(seed=seed)
        self._round = 0
        self._batch_obs = create_empty_array(self.single_observation_space, num_envs)

    def reset(self, seed: int | None = None) -> None:
        self.here.reset(seed=seed)

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self.actions[...] = actions[self.split :]
        self._round += 1
        self.control[_GO] = self._round
        obs, rewards, terminations, truncations, _ = self.here.step(actions[: self.split])
        while self.control[_DONE] != self._round:
            if not self.child.is_alive():
                raise RuntimeError(f"the ideal pair's child process died (exit code {self.child.exitcode})")
        batch = concatenate(self.single_observation_space, [*obs, *self.obs], self._batch_obs)
        return (
            batch,
            np.concatenate([rewards, self.rewards]),
            np.concatenate([terminations, self.terminations]),
            np.concatenate([truncations, self.truncations]),
            {},
        )

    def close(self) -> None:
        self.control[_STOP] = 1
        self.child.join(5)
        if self.child.is_alive():
            self.child.kill()
            self.child.join()
        self.here.close()
        del self.control, self.obs, self.actions, self.rewards, self.terminations, self.truncations
        self.segment.close()
        self.segment.unlink()


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _arrays(buffer: memoryview, shapes: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
    arrays, offset = [], 0
    for shape, dtype in shapes:
        arrays.append(np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset))
        offset += _nbytes(shape, dtype)
    return arrays


def _serve(
    env_id: str, kwargs: dict[str, Any], count: int, seed: int, name: str, shapes: list[tuple[tuple[int, ...], Any]]
) -> None:
    """The child: steps its half whenever the GO word moves, until STOP."""
    segment = multiprocessing.shared_memory.SharedMemory(name=name)
    control, obs, actions, rewards, terminations, truncations = _arrays(segment.buf, shapes)
    envs = gym.make_vec(env_id, count, vectorization_mode="sync", **kwargs)
    envs.reset(seed=seed)
    served = 0
    try:
        while not control[_STOP]:
            if control[_GO] == served:
                continue
            served = int(control[_GO])
            obs[...], rewards[...], terminations[...], truncations[...], _ = envs.step(actions.copy())
            control[_DONE] = served
    finally:
        envs.close()
        del control, obs, actions, rewards, terminations, truncations
        segment.close()
