"""The trainer's observation batch buffer: one (num_envs, ...) array per fixed leaf of the space.

With `shared=True` the arrays live in one POSIX shared-memory segment that same-host workers
write into directly; a nonce after the arrays lets a worker prove it really reached this segment.
Non-fixed leaves (Text, Sequence, OneOf) are kept as lists of values and always travel as data.
"""

from __future__ import annotations

import copy as copy_module
import os
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import create_empty_array

from envfarm.protocol import spaces as space_codec

NONCE_BYTES = 16


class ObsBuffer:
    def __init__(self, space: spaces.Space, num_envs: int, *, shared: bool):
        self.space = space
        self.leaf_spaces = space_codec.leaves(space)
        layout, size = space_codec.shm_layout(space, num_envs)
        self.shm: SharedMemory | None = None
        self.descriptor: dict[str, Any] | None = None
        if shared and size > 0:
            # Registered with multiprocessing's resource tracker, which unlinks it if this process is killed.
            self.shm = SharedMemory(create=True, size=size + NONCE_BYTES)
            nonce = os.urandom(NONCE_BYTES)
            self.shm.buf[size : size + NONCE_BYTES] = nonce
            self.descriptor = {"name": self.shm.name.lstrip("/"), "size": size, "nonce": nonce, "layout": layout}
        self.leaves: list[Any] = []
        for leaf, where in zip(self.leaf_spaces, layout):
            if where is None:
                self.leaves.append(list(create_empty_array(leaf, n=num_envs)))
            elif self.shm is not None:
                offset, dtype, shape = where
                self.leaves.append(np.ndarray(shape, dtype=np.dtype(dtype), buffer=self.shm.buf, offset=offset))
            else:
                self.leaves.append(np.zeros((num_envs, *leaf.shape), dtype=leaf.dtype))

    def write(self, rows: slice | Sequence[int], payload: Sequence[Any]) -> None:
        """Stores one worker's observations; a None leaf was already written in shared memory."""
        for leaf, values in zip(self.leaves, payload):
            if values is None:
                continue
            if isinstance(leaf, np.ndarray):
                leaf[rows] = values
            else:
                for i, value in zip(range(len(leaf))[rows] if isinstance(rows, slice) else rows, values):
                    leaf[i] = value

    def batch(self, copy: bool) -> Any:
        """The batched observation, structured as Gymnasium's `concatenate` builds it."""
        if copy:
            leaves = (leaf.copy() if isinstance(leaf, np.ndarray) else copy_module.deepcopy(tuple(leaf)) for leaf in self.leaves)
        else:
            leaves = (leaf if isinstance(leaf, np.ndarray) else tuple(leaf) for leaf in self.leaves)
        return space_codec.join(self.space, leaves)

    def rows(self, env_ids: Sequence[int]) -> Any:
        """A new batch holding the observations of these envs, in this order."""
        leaves = (leaf[env_ids] if isinstance(leaf, np.ndarray) else tuple(leaf[i] for i in env_ids) for leaf in self.leaves)
        return space_codec.join(self.space, leaves)

    def close(self) -> None:
        if self.shm is not None:
            self.leaves = []  # drop the views before closing the mapping
            try:
                self.shm.close()
            except BufferError:  # the user still holds a view (copy=False): unlink anyway
                pass
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            self.shm = None
