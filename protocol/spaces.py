"""The space codec (Gymnasium spaces <-> plain data) and how a batch of values travels.

A space is carried as a map with a "type" and its parameters; arrays inside (Box bounds,
MultiDiscrete nvec) travel as array frames. Box, Discrete, MultiDiscrete, MultiBinary, Text,
Dict, Tuple, Sequence and OneOf are carried; any other space raises UnsupportedSpaceError naming it.

A batch of values of a space is split into its leaves (depth first, Dict keys in the space's
order). A *fixed* leaf (Box, Discrete, MultiDiscrete, MultiBinary) is one array of shape
(n, *leaf.shape) and dtype leaf.dtype, which is what can live in shared memory; any other leaf
(Text, Sequence, OneOf) is a list of n values. `join` rebuilds the nested structure the way
Gymnasium's batching does: Dict -> dict, Tuple -> tuple, fixed leaf -> array, other leaf -> tuple.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from gymnasium import spaces

from envfarm.protocol.errors import ProtocolError

FIXED_LEAVES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


class UnsupportedSpaceError(TypeError):
    """A space the wire format cannot describe."""


def encode_space(space: spaces.Space) -> dict[str, Any]:
    """Describes a space as plain data."""
    if isinstance(space, spaces.Box):
        # An integer Box keeps infinite bounds as its dtype's limits plus these flags.
        return {
            "type": "Box",
            "low": space.low,
            "high": space.high,
            "dtype": space.dtype.str,
            "bounded_below": space.bounded_below,
            "bounded_above": space.bounded_above,
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start), "dtype": space.dtype.str}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec, "start": space.start, "dtype": space.dtype.str}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.Text):
        return {
            "type": "Text",
            "min_length": space.min_length,
            "max_length": space.max_length,
            "charset": "".join(space.character_list),
        }
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": [[key, encode_space(sub)] for key, sub in space.spaces.items()]}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [encode_space(sub) for sub in space.spaces]}
    if isinstance(space, spaces.Sequence):
        return {"type": "Sequence", "feature_space": encode_space(space.feature_space), "stack": space.stack}
    if isinstance(space, spaces.OneOf):
        return {"type": "OneOf", "spaces": [encode_space(sub) for sub in space.spaces]}
    raise UnsupportedSpaceError(
        f"envfarm cannot carry the space {space!r} ({type(space).__qualname__}); it carries "
        "Box, Discrete, MultiDiscrete, MultiBinary, Text, Dict, Tuple, Sequence and OneOf"
    )


def decode_space(data: Any) -> spaces.Space:
    """Rebuilds a space from `encode_space`'s data; raises ProtocolError on anything else."""
    if isinstance(data, spaces.Space):  # a trusted link may carry a custom space as itself
        return data
    try:
        return _DECODERS[data["type"]](data)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"cannot decode a space from {data!r:.200}: {type(e).__name__}: {e}") from None


_DECODERS: dict[str, Callable[[dict], spaces.Space]] = {
    "Box": lambda d: _box(d),
    "Discrete": lambda d: spaces.Discrete(d["n"], start=d["start"], dtype=np.dtype(d["dtype"])),
    "MultiDiscrete": lambda d: spaces.MultiDiscrete(d["nvec"], start=d["start"], dtype=np.dtype(d["dtype"])),
    "MultiBinary": lambda d: spaces.MultiBinary(d["n"]),
    "Text": lambda d: spaces.Text(d["max_length"], min_length=d["min_length"], charset=d["charset"]),
    "Dict": lambda d: spaces.Dict([(key, decode_space(sub)) for key, sub in d["spaces"]]),  # pairs keep their order
    "Tuple": lambda d: spaces.Tuple([decode_space(sub) for sub in d["spaces"]]),
    "Sequence": lambda d: spaces.Sequence(decode_space(d["feature_space"]), stack=d["stack"]),
    "OneOf": lambda d: spaces.OneOf([decode_space(sub) for sub in d["spaces"]]),
}


def _box(data: dict) -> spaces.Box:
    box = spaces.Box(data["low"], data["high"], dtype=np.dtype(data["dtype"]))
    for flag in ("bounded_below", "bounded_above"):
        if flag in data:
            setattr(box, flag, np.asarray(data[flag], dtype=bool).reshape(box.shape) & getattr(box, flag))
    return box


def leaves(space: spaces.Space) -> list[spaces.Space]:
    """The leaf spaces of a space, depth first."""
    if isinstance(space, spaces.Dict):
        return [leaf for sub in space.spaces.values() for leaf in leaves(sub)]
    if isinstance(space, spaces.Tuple):
        return [leaf for sub in space.spaces for leaf in leaves(sub)]
    return [space]


def is_nested(space: spaces.Space) -> bool:
    """Whether the space has sub-spaces (a Dict or Tuple), i.e. is more than its one leaf."""
    return isinstance(space, (spaces.Dict, spaces.Tuple))


def is_fixed(leaf: spaces.Space) -> bool:
    return isinstance(leaf, FIXED_LEAVES)


def split(space: spaces.Space, value: Any) -> list[Any]:
    """One value of `space` (or a batch of them) as the list of its leaf values, in `leaves` order."""
    if isinstance(space, spaces.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in split(sub, value[key])]
    if isinstance(space, spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in split(sub, value[i])]
    return [value]


def join(space: spaces.Space, leaf_values: Iterator[Any]) -> Any:
    """The inverse of `split`: rebuilds the nested value from an iterator over its leaf values."""
    if isinstance(space, spaces.Dict):
        return {key: join(sub, leaf_values) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(join(sub, leaf_values) for sub in space.spaces)
    return next(leaf_values)


Region = tuple[int, str, tuple[int, ...]]  # (byte offset, dtype, shape) of one array in a shared buffer


def shm_layout(space: spaces.Space, num_envs: int, start: int = 0) -> tuple[list[Region | None], int]:
    """Where each fixed leaf's (num_envs, *shape) array lies in a shared buffer, from `start`.

    Returns ([region, or None for a non-fixed leaf, ...], the offset after the last region).
    """
    layout: list[Region | None] = []
    offset = start
    for leaf in leaves(space):
        if not is_fixed(leaf):
            layout.append(None)
            continue
        shape = (num_envs, *leaf.shape)
        layout.append((offset, leaf.dtype.str, shape))
        offset = _aligned(offset + int(np.prod(shape)) * leaf.dtype.itemsize)
    return layout, offset


def batch_layout(
    observation_space: spaces.Space, action_space: spaces.Space, num_envs: int
) -> tuple[dict[str, Any], int]:
    """The shared batch buffer: observations, actions, rewards, terminations and truncations.

    Returns ({"obs": [region...], "actions": [region...], "rewards": region, "terminated": region,
    "truncated": region}, total bytes).
    """
    obs, offset = shm_layout(observation_space, num_envs)
    actions, offset = shm_layout(action_space, num_envs, offset)
    layout: dict[str, Any] = {"obs": obs, "actions": actions}
    for name, dtype in (
        ("rewards", np.dtype(np.float64)),
        ("terminated", np.dtype(np.bool_)),
        ("truncated", np.dtype(np.bool_)),
    ):
        layout[name] = (offset, dtype.str, (num_envs,))
        offset = _aligned(offset + num_envs * dtype.itemsize)
    return layout, offset


def _aligned(offset: int, align: int = 64) -> int:
    return -(-offset // align) * align


def batch_rows(buffer: Any, layout: dict[str, Any], first_row: int, num_rows: int) -> dict[str, Any]:
    """Views of rows [first_row, first_row + num_rows) of every array of the trainer's batch buffer:
    {"obs": [view or None per leaf], "actions": [...], "rewards": view, "terminated": view, "truncated": view}."""

    def rows(region: Any) -> np.ndarray | None:
        if region is None:
            return None
        offset, dtype, shape = region
        return np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=buffer, offset=offset)[
            first_row : first_row + num_rows
        ]

    views: dict[str, Any] = {name: [rows(region) for region in layout[name]] for name in ("obs", "actions")}
    views.update({name: rows(layout[name]) for name in ("rewards", "terminated", "truncated")})
    return views
