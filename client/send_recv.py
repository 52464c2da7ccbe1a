"""EnvPool-style asynchronous stepping for FarmVectorEnv: `send` actions, `recv` the first envs done.

    envs = envfarm.make_vec("CartPole-v1", num_envs=32, batch_size=16)
    envs.async_reset(seed=0)
    for _ in range(1000):
        obs, rewards, terminated, truncated, info = envs.recv()   # the first 16 envs that are ready
        envs.send(policy(obs), info["env_id"])                   # step exactly those envs

With `num_envs` larger than `batch_size`, a slow env never stalls a batch, and the envs step while
the policy computes. Every env's trajectory is the one it would have alone (its autoreset mode
included); only the order in which envs come back varies. `recv` batches infos like Gymnasium
(with `_key` masks) over the batch, and adds `info["env_id"]`, the env index of each row.

Work goes out per worker: a worker steps the envs it was sent in one message; envs sent to a
worker that is busy wait in the trainer and go out together when it replies.
"""

from __future__ import annotations

import collections
import multiprocessing
from typing import Any, Sequence

import numpy as np
from gymnasium import Space
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv

from envfarm.client.checks import action_leaves
from envfarm.client.errors import FarmError, raise_env_errors
from envfarm.client.shared_state import SharedState
from envfarm.client.worker_handle import WorkerHandle
from envfarm.client.worker_pool import WorkerPool
from envfarm.protocol import infos as info_codec
from envfarm.protocol import messages as m

IDLE, RUNNING, READY = 0, 1, 2


class _InfoBatch:
    """Gymnasium's info batching (`_key` masks and all) over a batch of `num_envs` rows."""

    _add_info = VectorEnv._add_info

    def __init__(self, num_envs: int):
        self.num_envs = num_envs


class SendRecv:
    """The send/recv API over a pool's workers. FarmVectorEnv owns one and its `async_reset`, `send`
    and `recv` call it once their guards have passed (not closed, not failed, no call pending); the
    docs of those three are FarmVectorEnv's.

    Each env is IDLE (free to send or reset), RUNNING (sent, in a worker or queued for it) or
    READY (its result is in, for `recv` to return). `shared` (which envs ended, the failure) is
    the vector env's, which its other API reads and writes too.
    """

    def __init__(
        self,
        pool: WorkerPool,
        shared: SharedState,
        single_action_space: Space,
        autoreset_mode: AutoresetMode,
        batch_size: int | None,
    ):
        self.num_envs = len(shared.ended)
        if batch_size is None:
            batch_size = self.num_envs
        if not 1 <= batch_size <= self.num_envs:
            raise ValueError(f"batch_size must be between 1 and num_envs={self.num_envs}, got {batch_size}")
        self.batch_size = batch_size
        self._pool, self._router, self._workers = pool, pool.router, pool.workers
        self._shared = shared
        self._single_action_space = single_action_space
        self._autoreset_mode = autoreset_mode
        self._worker_of_env = np.concatenate([np.full(len(w.env_ids), w.index) for w in pool.workers])
        self._env_status = np.full(self.num_envs, IDLE, np.int8)
        self._ready: collections.deque[int] = collections.deque()
        self._ready_infos: dict[int, dict[str, Any]] = {}
        self._ready_errors: dict[int, tuple[Any, str]] = {}
        self._in_flight: dict[WorkerHandle, tuple[int, str, list[int]]] = {}
        self._queued: dict[WorkerHandle, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)

    @property
    def busy(self) -> bool:
        """Whether an env was sent or reset and its result not received yet (the other API waits for it)."""
        return bool(self._env_status.any())  # IDLE is 0

    def async_reset(
        self, seed: int | list[int | None] | None, options: dict[str, Any] | None, env_ids: Sequence[int] | None
    ) -> None:
        """`FarmVectorEnv.async_reset`, once its guards have passed."""
        ids = self._idle_ids(range(self.num_envs) if env_ids is None else env_ids, "async_reset")
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in ids]
        elif len(seed) != len(ids):
            raise ValueError(f"async_reset got {len(seed)} seeds for {len(ids)} envs")
        else:
            seeds = list(seed)
        by_env = dict(zip(ids, seeds))
        for worker, worker_ids in self._by_worker(ids):
            self._submit(
                worker, m.RESET, {"envs": worker_ids, "seeds": [by_env[i] for i in worker_ids], "options": options}
            )

    def send(self, actions: Any, env_ids: Sequence[int] | np.ndarray) -> None:
        """`FarmVectorEnv.send`, once its guards have passed."""
        ids = self._idle_ids(env_ids, "send")
        self._take_replies(0.0)  # results already in come before those of this send (an inline worker's are instant)
        leaves = action_leaves(self._single_action_space, actions, len(ids))
        ended = self._shared.ended
        if self._autoreset_mode == AutoresetMode.DISABLED and ended[ids].any():
            raise ResetNeeded(
                f"envs {[i for i in ids if ended[i]]} terminated or truncated and autoreset_mode is DISABLED: "
                "async_reset them before sending actions"
            )
        # Shared-memory workers read row i of the batch buffer for env i; the others get their rows sent.
        buffer = self._pool.buffer
        buffer.write_actions(ids, leaves)
        row_of = {env_id: row for row, env_id in enumerate(ids)}
        for worker, worker_ids in self._by_worker(ids):
            actions = buffer.action_payload(leaves, [row_of[i] for i in worker_ids], worker.shared_memory)
            self._submit(worker, m.STEP, {"envs": worker_ids, "actions": actions})

    def recv(self, timeout: float | None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """`FarmVectorEnv.recv`, once its guards have passed."""
        waiting = len(self._ready) + int((self._env_status == RUNNING).sum())
        if waiting < self.batch_size:
            raise RuntimeError(
                f"recv() needs {self.batch_size} envs (batch_size) running or ready, but only {waiting} are: "
                "send actions (or async_reset) for more envs first"
            )
        self._take_replies(0.0)
        while len(self._ready) < self.batch_size:
            if not self._take_replies(timeout):
                raise multiprocessing.TimeoutError(f"The call to `recv` has timed out after {timeout} second(s).")
        ids = [self._ready.popleft() for _ in range(self.batch_size)]
        failed = [i for i in ids if i in self._ready_errors]
        if failed:
            for i in reversed([i for i in ids if i not in self._ready_errors]):
                self._ready.appendleft(i)
            for i in failed:
                self._env_status[i] = IDLE
            raise_env_errors(
                [
                    (worker, {"kind": m.RESULT, "errors": [[i, self._ready_errors.pop(i)]]})
                    for i in failed
                    for worker in [self._owner(i)]
                ]
            )
        self._env_status[ids] = IDLE
        batch = _InfoBatch(len(ids))
        infos: dict[str, Any] = {}
        for row, i in enumerate(ids):
            infos = batch._add_info(infos, self._ready_infos.pop(i), row)
        infos["env_id"] = np.asarray(ids, dtype=np.int32)
        buffer = self._pool.buffer
        return buffer.rows(ids), buffer.rewards[ids], buffer.terminations[ids], buffer.truncations[ids], infos

    # ----------------------------------------------------------------- internals

    def _idle_ids(self, env_ids: Sequence[int] | np.ndarray, call: str) -> list[int]:
        """The env ids of a call, checked: distinct, in range and idle."""
        ids = [int(i) for i in np.asarray(env_ids).reshape(-1)]
        if not ids:
            raise ValueError(f"{call}() needs at least one env id")
        if len(set(ids)) != len(ids) or not all(0 <= i < self.num_envs for i in ids):
            raise ValueError(f"{call}() env ids must be distinct and in [0, {self.num_envs}), got {ids}")
        busy = [i for i in ids if self._env_status[i] != IDLE]
        if busy:
            raise ValueError(f"{call}(): envs {busy} are still running or their results were not received yet")
        return ids

    def _by_worker(self, ids: list[int]) -> list[tuple[WorkerHandle, list[int]]]:
        groups: dict[WorkerHandle, list[int]] = {}
        for i in ids:
            groups.setdefault(self._owner(i), []).append(i)
        return sorted(groups.items(), key=lambda item: item[0].index)

    def _owner(self, env_id: int) -> WorkerHandle:
        return self._workers[self._worker_of_env[env_id]]

    def _submit(self, worker: WorkerHandle, kind: str, fields: dict[str, Any]) -> None:
        """Sends at once if the worker is free, else queues (its mailbox holds one request)."""
        self._env_status[fields["envs"]] = RUNNING
        if worker in self._in_flight:
            self._queued[worker].append((kind, fields))
            return
        rid = self._router.new_rid()
        try:
            self._router.send(worker, m.make(kind, rid, **fields))
        except FarmError as e:
            self._shared.failure = e
            raise
        self._in_flight[worker] = (rid, kind, fields["envs"])

    def _take_replies(self, timeout: float | None) -> bool:
        """Moves the replies that arrive within `timeout` into the ready queue; False if none did."""
        expected = {worker: rid for worker, (rid, _, _) in self._in_flight.items()}
        if not expected:
            return False
        try:
            replies = self._router.collect(expected, timeout, wait_all=False)
        except multiprocessing.TimeoutError:
            return False
        except FarmError as e:
            self._shared.failure = e
            raise
        for worker, reply in sorted(replies.items(), key=lambda item: item[0].index):
            self._on_reply(worker, reply)
        return True

    def _on_reply(self, worker: WorkerHandle, reply: dict[str, Any]) -> None:
        _, kind, env_ids = self._in_flight.pop(worker)
        buffer = self._pool.buffer
        if reply["kind"] == m.ERROR:
            errors = [[i, reply["error"]] for i in env_ids]
            reply = {
                "envs": env_ids,
                "obs": [None] * len(buffer.leaves),
                "infos": [{}] * len(env_ids),
                "errors": errors,
            }
        else:
            errors = reply["errors"]
            buffer.write(env_ids, reply["obs"])
        if kind == m.STEP and "rewards" in reply:
            buffer.write_results(env_ids, reply)
        else:
            buffer.rewards[env_ids] = 0.0
            buffer.terminations[env_ids] = buffer.truncations[env_ids] = False
        self._shared.ended[env_ids] = buffer.terminations[env_ids] | buffer.truncations[env_ids]
        for i, info in zip(env_ids, info_codec.unbatch(reply["infos"], len(env_ids))):
            self._ready_infos[i] = info
        for i, error in errors:
            self._ready_errors[i] = error
        self._ready.extend(env_ids)
        self._env_status[env_ids] = READY
        if self._queued[worker]:
            kind, fields = self._queued[worker].pop(0)
            self._env_status[fields["envs"]] = IDLE  # _submit marks them running again
            self._submit(worker, kind, fields)
