"""The envs one worker hosts: reset, step with Gymnasium's autoreset modes, call, set_attr.

Knows nothing of sockets. Observations are written into `obs_rows`, one (K, ...) array per fixed
leaf of the observation space: views of the trainer's shared batch buffer when the worker could
attach to it, else private arrays whose rows travel as frames. An exception in one env is caught
and reported for that env; the others carry on, and the failed env must be reset before its next
step (its state is unknown).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import Env
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode

from envfarm.protocol import infos as info_codec
from envfarm.protocol import spaces as space_codec
from envfarm.protocol.errors import ErrorInfo

EnvErrors = list[list]  # [[global env index, error data], ...]


class HostedEnvs:
    """K envs with global indices `env_ids`, stepped together for one message."""

    def __init__(self, envs: Sequence[Env], env_ids: Sequence[int], autoreset_mode: AutoresetMode):
        self.envs = list(envs)
        self.env_ids = list(env_ids)
        self._position = {env_id: i for i, env_id in enumerate(self.env_ids)}
        self.autoreset_mode = autoreset_mode
        self.observation_space = self.envs[0].observation_space
        self.leaf_spaces = space_codec.leaves(self.observation_space)
        count = len(self.envs)
        self.use_private_memory()
        self.autoreset = np.zeros(count, np.bool_)
        self.failed = np.zeros(count, np.bool_)
        self._value_leaves: list[list[Any]] = [[None] * count for _ in self.leaf_spaces]
        self._action_space = self.envs[0].action_space
        self._nested_obs = space_codec.is_nested(self.observation_space)
        self._nested_action = space_codec.is_nested(self._action_space)

    def use_private_memory(self) -> None:
        """Keeps observations and results in arrays of this process; they travel in the replies."""
        count = len(self.envs)
        self.obs_rows: list[np.ndarray | None] = [
            np.zeros((count, *leaf.shape), leaf.dtype) if space_codec.is_fixed(leaf) else None
            for leaf in self.leaf_spaces
        ]
        self.action_rows: list[np.ndarray | None] = [None] * len(space_codec.leaves(self.envs[0].action_space))
        self.rewards = np.zeros(count, np.float64)
        self.terminations = np.zeros(count, np.bool_)
        self.truncations = np.zeros(count, np.bool_)
        self.in_shared_memory = False

    def use_shared_memory(self, views: dict[str, Any]) -> None:
        """Reads actions from and writes results into these (K, ...) views of the trainer's batch buffer."""
        self.obs_rows = views["obs"]
        self.action_rows = views["actions"]
        self.rewards, self.terminations, self.truncations = views["rewards"], views["terminated"], views["truncated"]
        self.in_shared_memory = True

    def _store_obs(self, i: int, obs: Any) -> None:
        leaf_values = space_codec.split(self.observation_space, obs) if self._nested_obs else (obs,)
        for rows, values, value in zip(self.obs_rows, self._value_leaves, leaf_values):
            if rows is not None:
                if getattr(value, "shape", None) != rows.shape[1:] and np.shape(value) != rows.shape[1:]:
                    # Numpy would store None as NaN, or broadcast a scalar over the row; SyncVectorEnv's
                    # batching refuses both with this error.
                    raise ValueError(
                        f"all input arrays must have the same shape: env {self.env_ids[i]} returned an observation "
                        f"of shape {np.shape(value)} ({type(value).__name__}), its space's shape is {rows.shape[1:]}"
                    )
                rows[i] = value
            else:
                values[i] = value

    def _action(self, action_leaves: list[Any], row: int, i: int) -> Any:
        """Env i's action: row `row` of a leaf sent in the message, or row i of the shared one (None)."""
        if self._nested_action:
            return space_codec.join(
                self._action_space,
                (shared[i] if leaf is None else leaf[row] for leaf, shared in zip(action_leaves, self.action_rows)),
            )
        leaf = action_leaves[0]
        return self.action_rows[0][i] if leaf is None else leaf[row]

    def _obs_payload(self, local: list[int] | slice, positions: Sequence[int]) -> list[Any]:
        """Per leaf: the rows that travel as frames, or None where they are already in shared memory."""
        payload = []
        for rows, values in zip(self.obs_rows, self._value_leaves):
            if rows is None:
                payload.append([values[i] for i in positions])
            else:
                payload.append(None if self.in_shared_memory else rows[local])
        return payload

    def _error(self, errors: EnvErrors, i: int, exc: BaseException) -> None:
        self.failed[i] = True
        errors.append([self.env_ids[i], ErrorInfo.from_exception(exc).to_data()])

    def _positions(self, env_ids: Sequence[int]) -> tuple[list[int] | slice, Sequence[int]]:
        """Where these global env ids sit in this worker, as an index (a slice when they are all of
        them, so that arrays are sliced, not copied) and as positions to loop over."""
        if len(env_ids) == len(self.env_ids) and list(env_ids) == self.env_ids:
            return slice(None), range(len(self.envs))
        try:
            positions = [self._position[env_id] for env_id in env_ids]
        except KeyError as e:
            raise ValueError(f"env {e.args[0]} is not hosted by this worker (it hosts {self.env_ids})") from None
        return positions, positions

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int | None], options: dict | None) -> dict[str, Any]:
        local, positions = self._positions(env_ids)
        infos, errors = [], []
        for i, seed in zip(positions, seeds):
            self.terminations[i] = self.truncations[i] = self.autoreset[i] = False
            try:
                obs, info = self.envs[i].reset(seed=seed, options=options)
                self._store_obs(i, obs)
                self.failed[i] = False
            except Exception as exc:
                self._error(errors, i, exc)
                info = {}
            infos.append(info)
        return {
            "envs": list(env_ids),
            "obs": self._obs_payload(local, positions),
            "infos": info_codec.batch(infos),
            "errors": errors,
        }

    def step(self, env_ids: Sequence[int], action_leaves: list[Any]) -> dict[str, Any]:
        """Steps the envs `env_ids` (all or some of this worker's); row j of each action leaf is env_ids[j]'s."""
        local, positions = self._positions(env_ids)
        infos, errors = [], []
        for row, i in enumerate(positions):
            info: dict[str, Any] = {}
            try:
                if self.failed[i]:
                    raise ResetNeeded(
                        f"env {self.env_ids[i]} raised an exception earlier and its state is unknown: "
                        "reset it (options={'reset_mask': mask}) before stepping it again"
                    )
                info = self._step_one(i, self.envs[i], self._action(action_leaves, row, i))
            except Exception as exc:
                self._error(errors, i, exc)
                self.rewards[i], self.terminations[i], self.truncations[i] = 0.0, False, False
            infos.append(info)
        self.autoreset[local] = self.terminations[local] | self.truncations[local]
        shared = self.in_shared_memory
        return {
            "envs": list(env_ids),
            "rewards": None if shared else self.rewards[local],
            "terminated": None if shared else self.terminations[local],
            "truncated": None if shared else self.truncations[local],
            "obs": self._obs_payload(local, positions),
            "infos": info_codec.batch(infos),
            "errors": errors,
        }

    def _step_one(self, i: int, env: Env, action: Any) -> dict[str, Any]:
        """Steps env i under the autoreset mode, exactly as gymnasium.vector.SyncVectorEnv does."""
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self.autoreset[i]:
            obs, info = env.reset()
            self.rewards[i], self.terminations[i], self.truncations[i] = 0.0, False, False
        else:
            obs, self.rewards[i], self.terminations[i], self.truncations[i], info = env.step(action)
            if self.autoreset_mode == AutoresetMode.SAME_STEP and (self.terminations[i] or self.truncations[i]):
                final_obs, final_info = obs, info
                obs, reset_info = env.reset()
                info = {"final_obs": final_obs, "final_info": final_info, **reset_info}
        self._store_obs(i, obs)
        return info

    def call(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        values, errors = [], []
        for i, env in enumerate(self.envs):
            value = None
            try:
                attr = env.get_wrapper_attr(name)
                value = attr(*args, **kwargs) if callable(attr) else attr
            except Exception as exc:
                errors.append([self.env_ids[i], ErrorInfo.from_exception(exc).to_data()])
            values.append(value)
        return {"values": values, "errors": errors}

    def set_attr(self, name: str, values: Sequence[Any]) -> dict[str, Any]:
        errors = []
        for i, (env, value) in enumerate(zip(self.envs, values)):
            try:
                env.set_wrapper_attr(name, value)
            except Exception as exc:
                errors.append([self.env_ids[i], ErrorInfo.from_exception(exc).to_data()])
        return {"errors": errors}

    def close(self) -> dict[str, Any]:
        errors = []
        for i, env in enumerate(self.envs):
            try:
                env.close()
            except Exception as exc:
                errors.append([self.env_ids[i], ErrorInfo.from_exception(exc).to_data()])
        return {"errors": errors}
