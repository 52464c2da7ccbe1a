"""How FarmVectorEnv checks what it is given, in Gymnasium's own words where Gymnasium has them:
its spaces (and whether shared memory can hold them), a batch of actions, a reset mask, and how
many workers its arguments ask for (and whether they and torch's threads outnumber the CPUs)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from gymnasium import Space, logger, spaces
from gymnasium.spaces.utils import is_space_dtype_shape_equiv
from gymnasium.vector.utils import batch_differing_spaces, batch_space

from envfarm.protocol import spaces as space_codec
from envfarm.transport.cpus import available_cpus

# Gymnasium's own leaf spaces; any other is a custom space, carried as values (pickled, locally).
STANDARD_LEAVES = (
    spaces.Box,
    spaces.Discrete,
    spaces.MultiDiscrete,
    spaces.MultiBinary,
    spaces.Text,
    spaces.Graph,
    spaces.Sequence,
    spaces.OneOf,
)


def choose_spaces(
    owner: str, mode: str | tuple[Space, Space], obs_spaces: list[Space], action_spaces: list[Space]
) -> tuple[Space, Space, Space, Space]:
    """(single_observation_space, observation_space, single_action_space, action_space) of the
    vector env `owner` (its class name) under `observation_mode`, from each env's spaces, chosen
    and checked exactly as AsyncVectorEnv does."""
    num_envs = len(obs_spaces)
    single_action_space = action_spaces[0]
    action_space = batch_space(single_action_space, num_envs)
    if isinstance(mode, tuple) and len(mode) == 2:
        if not isinstance(mode[0], Space) or not isinstance(mode[1], Space):
            raise TypeError(
                f"Expected both elements of observation_mode to be Spaces, got {type(mode[0])} and {type(mode[1])}"
            )
        observation_space, single_observation_space = mode
    elif mode == "same":
        single_observation_space = obs_spaces[0]
        observation_space = batch_space(single_observation_space, num_envs)
    elif mode == "different":
        single_observation_space = obs_spaces[0]
        observation_space = batch_differing_spaces(obs_spaces)
    else:
        raise ValueError(
            f"Invalid `observation_mode`, expected: 'same' or 'different' or tuple of single and batch observation space, actual got {mode}"
        )
    if mode == "same":
        if any(space != single_observation_space for space in obs_spaces):
            raise RuntimeError(
                f"{owner}(..., observation_mode='same') however some of the sub-environments observation spaces are not equivalent. "
                "If this is intentional, use `observation_mode='different'` instead."
            )
    elif not all(is_space_dtype_shape_equiv(space, single_observation_space) for space in obs_spaces):
        raise RuntimeError(
            f"{owner}(..., observation_mode='different' or custom space) however the sub-environment's observation spaces do not share a common shape and dtype."
        )
    if any(space != single_action_space for space in action_spaces):
        raise RuntimeError(
            f"Some environments have an action space different from `{single_action_space}`. "
            "In order to batch actions, the action spaces from all environments must be equal."
        )
    return single_observation_space, observation_space, single_action_space, action_space


def check_shared_memory(single_observation_space: Space, shared_memory: bool) -> None:
    """Refuses shared memory for a custom observation space, in AsyncVectorEnv's words: Gymnasium
    cannot put one in shared memory either."""
    if shared_memory and any(
        not isinstance(leaf, STANDARD_LEAVES) for leaf in space_codec.leaves(single_observation_space)
    ):
        raise ValueError(
            "Using `AsyncVector(..., shared_memory=True)` caused an error, you can disable this feature with `shared_memory=False` however this is slower."
        )


def action_leaves(single_action_space: Space, actions: Any, count: int) -> list[Any]:
    """A batch of `count` actions split into per-leaf batches, each checked against the action space."""
    try:
        leaves = space_codec.split(single_action_space, actions)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"actions do not match action_space {batch_space(single_action_space, count)}: {type(e).__name__}: {e}"
        ) from None
    checked = []
    for space, leaf in zip(space_codec.leaves(single_action_space), leaves):
        if space_codec.is_fixed(space):
            leaf = np.asarray(leaf)
            if (
                leaf.ndim == 0 and count > 0 and not leaf.dtype.hasobject
            ):  # SyncVectorEnv fails on it with a TypeError too
                raise TypeError(
                    f"actions must be a batch with one row per env ({count}), got the scalar {leaf.item()!r:.100}"
                )
            if leaf.shape != (count, *space.shape) or leaf.dtype.hasobject:
                raise ValueError(
                    f"actions for {space} must be an array of shape {(count, *space.shape)} "
                    f"(one row per env), got {'dtype object' if leaf.dtype.hasobject else f'shape {leaf.shape}'}"
                )
        elif not isinstance(leaf, (list, tuple)) or len(leaf) != count:
            raise ValueError(f"actions for {space} must be a tuple of {count} values, got {leaf!r:.100}")
        checked.append(leaf)
    return checked


def check_reset_mask(reset_mask: Any, num_envs: int) -> np.ndarray:
    """Validates `options["reset_mask"]` with Gymnasium's own messages."""
    if not isinstance(reset_mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(reset_mask)}")
    if reset_mask.shape != (num_envs,):
        raise ValueError(f"`options['reset_mask']` must have shape `({num_envs},)`, got {reset_mask.shape}")
    if reset_mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {reset_mask.dtype}")
    if not np.any(reset_mask):
        raise ValueError(
            f"`options['reset_mask']` must contain a boolean array with at least one True value, got reset_mask={reset_mask}"
        )
    return reset_mask


def worker_count(
    num_envs: int, num_workers: int | None, envs_per_worker: int | None, max_concurrency: int | None
) -> int:
    """How many worker processes for `num_envs` envs, from FarmVectorEnv's sizing arguments."""
    if num_workers is not None and envs_per_worker is not None:
        raise ValueError("pass either num_workers or envs_per_worker, not both")
    if envs_per_worker is not None:
        if envs_per_worker < 1:
            raise ValueError(f"envs_per_worker must be at least 1, got {envs_per_worker}")
        num_workers = -(-num_envs // envs_per_worker)
    if num_workers is None:
        num_workers = available_cpus()
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if max_concurrency is not None:
        if not isinstance(max_concurrency, (int, np.integer)):
            raise ValueError(f"`max_concurrency` must be an integer or None, got {type(max_concurrency)}.")
        if max_concurrency < 1:
            raise ValueError(f"`max_concurrency` must be a positive or None, got {max_concurrency}.")
        num_workers = min(num_workers, int(max_concurrency))
    return min(num_workers, num_envs)


_warned_of_oversubscription = False


def warn_of_oversubscription(local_workers: int) -> None:
    """Warns once when torch's threads in this process and the local workers together outnumber
    the CPUs: torch's idle threads busy-wait after each forward pass, on the cores the workers
    step their envs on."""
    global _warned_of_oversubscription
    torch = sys.modules.get("torch")
    if _warned_of_oversubscription or torch is None or local_workers == 0:
        return
    threads, cpus = torch.get_num_threads(), available_cpus()
    if threads > 1 and threads + local_workers > cpus:
        _warned_of_oversubscription = True
        logger.warn(
            f"envfarm: torch uses {threads} threads in this process beside {local_workers} worker processes on {cpus} CPUs; "
            "they take each other's cores. torch.set_num_threads(1) in the trainer (or fewer workers: num_workers=...) "
            "usually trains faster."
        )
