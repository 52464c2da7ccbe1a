"""The trainer's batch buffer: observations, actions, rewards, terminations and truncations.

One (num_envs, ...) array per fixed leaf of the observation and action spaces, and one
(num_envs,) array each for rewards, terminations and truncations. With `shared=True` they all
live in one POSIX shared-memory segment that same-host workers read their actions from and
write their results into (a worker proves it reached the segment by its nonce, see
transport/segments.py). Non-fixed observation leaves (Text, Sequence, OneOf) are lists of values and always
travel as data, as do non-fixed action leaves.
"""

from __future__ import annotations

import copy as copy_module
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import create_empty_array

from envfarm.protocol import spaces as space_codec
from envfarm.transport.segments import Segment


class BatchBuffer:
    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, num_envs: int, *, shared: bool):
        self.space, self.action_space, self.num_envs = observation_space, action_space, num_envs
        layout, size = space_codec.batch_layout(observation_space, action_space, num_envs)
        self.segment: Segment | None = None
        self.descriptor: dict[str, Any] | None = None
        if shared:
            self.segment = Segment(size)
            self.descriptor = {**self.segment.descriptor(), "layout": layout}

        def array(region: space_codec.Region) -> np.ndarray:
            offset, dtype, shape = region
            if self.segment is None:
                return np.zeros(shape, dtype=np.dtype(dtype))
            return np.ndarray(shape, dtype=np.dtype(dtype), buffer=self.segment.buffer, offset=offset)

        self.leaves: list[Any] = [
            array(region) if region is not None else _values(leaf, num_envs)
            for leaf, region in zip(space_codec.leaves(observation_space), layout["obs"])
        ]
        self.actions: list[np.ndarray | None] = [
            None if region is None else array(region) for region in layout["actions"]
        ]
        self.rewards = array(layout["rewards"])
        self.terminations = array(layout["terminated"])
        self.truncations = array(layout["truncated"])

    def write(self, rows: slice | Sequence[int], payload: Sequence[Any]) -> None:
        """Stores observations of these rows; a None leaf (or payload) was already written in shared memory."""
        if payload is None:
            return
        for leaf, values in zip(self.leaves, payload):
            if values is None:
                continue
            if isinstance(leaf, np.ndarray):
                leaf[rows] = values
            else:
                for i, value in zip(range(len(leaf))[rows] if isinstance(rows, slice) else rows, values):
                    leaf[i] = value

    def write_results(self, rows: slice | Sequence[int], reply: dict[str, Any]) -> None:
        """Stores rewards, terminations and truncations, unless already written in shared memory (None)."""
        for name, array in (
            ("rewards", self.rewards),
            ("terminated", self.terminations),
            ("truncated", self.truncations),
        ):
            if reply[name] is not None:
                array[rows] = reply[name]

    def write_actions(self, rows: slice | Sequence[int], leaves: Sequence[Any]) -> None:
        """Puts the fixed leaves of a batch of actions where shared-memory workers read them."""
        for shared, leaf in zip(self.actions, leaves):
            if takes_unchanged(shared, leaf):  # else its rows are sent in the messages
                shared[rows] = leaf

    def action_payload(self, leaves: Sequence[Any], rows: slice | list[int], shares_memory: bool) -> list[Any]:
        """A worker's rows of each leaf of a batch of actions, as its request carries them: None for a
        leaf it reads from this buffer instead (it shares memory, and the leaf went in unchanged).
        Both of FarmVectorEnv's APIs, step_async and send, build their requests with it."""
        return [
            None
            if shares_memory and takes_unchanged(shared, leaf)
            else (leaf[rows] if isinstance(leaf, np.ndarray) else [leaf[i] for i in _indices(rows, len(leaf))])
            for leaf, shared in zip(leaves, self.actions)
        ]

    def copy_from(self, other: BatchBuffer) -> None:
        """Takes every array's contents from another buffer of the same spaces and size."""
        for mine, theirs in zip(
            [*self.leaves, *self.actions, self.rewards, self.terminations, self.truncations],
            [*other.leaves, *other.actions, other.rewards, other.terminations, other.truncations],
        ):
            if isinstance(mine, np.ndarray):
                mine[...] = theirs
            elif isinstance(mine, list):
                mine[:] = theirs

    def batch(self, copy: bool) -> Any:
        """The batched observation, structured as Gymnasium's `concatenate` builds it."""
        if copy:
            leaves = (
                leaf.copy() if isinstance(leaf, np.ndarray) else copy_module.deepcopy(tuple(leaf))
                for leaf in self.leaves
            )
        else:
            leaves = (leaf if isinstance(leaf, np.ndarray) else tuple(leaf) for leaf in self.leaves)
        return space_codec.join(self.space, leaves)

    def rows(self, env_ids: Sequence[int]) -> Any:
        """A new batch holding the observations of these envs, in this order."""
        leaves = (
            leaf[env_ids] if isinstance(leaf, np.ndarray) else tuple(leaf[i] for i in env_ids) for leaf in self.leaves
        )
        return space_codec.join(self.space, leaves)

    def close(self) -> None:
        if self.segment is not None:
            self.leaves, self.actions = [], []
            self.rewards = self.terminations = self.truncations = None
            self.segment.close()


def takes_unchanged(shared: np.ndarray | None, leaf: Any) -> bool:
    """Whether a leaf of a batch of actions goes through its shared array unchanged: an env must see
    exactly the values the caller gave, as with SyncVectorEnv, never a cast (0.7 in an int64 row is 0)."""
    return shared is not None and isinstance(leaf, np.ndarray) and leaf.dtype == shared.dtype


def _values(leaf: spaces.Space, num_envs: int) -> list[Any]:
    """A leaf whose values are not arrays of one shape: a list of them, one per env (a custom
    space, for which Gymnasium has no empty value, starts as Nones)."""
    empty = create_empty_array(leaf, n=num_envs)
    return [None] * num_envs if empty is None else list(empty)


def _indices(rows: slice | list[int], length: int) -> range | list[int]:
    return range(length)[rows] if isinstance(rows, slice) else rows
