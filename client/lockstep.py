"""Lockstep: the requests and replies behind FarmVectorEnv's reset/step/call API, as SendRecv
(client/send_recv.py) is behind send/recv.

One call at a time: its request goes out to every worker, for the worker's whole block of envs (a
reset mask may leave some out), all sends before any reply is awaited; the replies are gathered
together and written into the batch buffer. Which call is pending is Gymnasium's AsyncState.
FarmVectorEnv checks the arguments, guards the calls and raises Gymnasium's errors; this turns
checked arguments into requests, and replies into results.

Under the restart policy (Farm.on_failure, client/farm.py) the pool builds a lost worker's envs
again while a step or reset awaits them; a step reports them as Gymnasium reports an end.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
from gymnasium import Space
from gymnasium.vector import AutoresetMode
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import iterate

from envfarm.client.errors import FarmError, raise_env_errors
from envfarm.client.shared_state import SharedState
from envfarm.client.worker_handle import WorkerHandle
from envfarm.client.worker_pool import WorkerPool
from envfarm.protocol import infos as info_codec
from envfarm.protocol import messages as m


class Lockstep:
    """The reset/step/call API's requests over a pool's workers. FarmVectorEnv owns one, and its
    `*_async`, `*_wait` and `set_attr` call it once their checks and guards have passed.
    `shared` (which envs ended, the failure) is the vector env's, which send/recv reads and
    writes too."""

    def __init__(self, pool: WorkerPool, shared: SharedState, autoreset_mode: AutoresetMode, observation_space: Space):
        self.state = AsyncState.DEFAULT  # which call is pending, if any
        self.pending: tuple[int, list[WorkerHandle]] | None = None  # its rid and workers, for close() to await
        self.num_envs = len(shared.ended)
        self._pool, self._workers = pool, pool.workers
        self._shared = shared
        self._autoreset_mode = autoreset_mode
        self._observation_space = observation_space
        # Workers restarted under NEXT_STEP: their envs were reported truncated, so their next step
        # is the autoreset step Gymnasium makes after every end (a reset, reward 0, no end).
        self._reset_at_next_step: set[WorkerHandle] = set()

    # ----------------------------------------------------------------- reset

    def reset(self, seeds: list[int | None], options: dict[str, Any] | None, reset_mask: np.ndarray | None) -> None:
        """Sends the resets of the envs in `reset_mask` (None: all), env i with seeds[i]."""
        requests = {}
        for worker in self._workers:
            env_ids = [i for i in worker.env_ids if reset_mask is None or reset_mask[i]]
            if env_ids:
                requests[worker] = {"envs": env_ids, "seeds": [seeds[i] for i in env_ids], "options": options}
            if len(env_ids) == len(worker.env_ids):
                self._reset_at_next_step.discard(worker)  # reset now: no autoreset step owed
        self._send(m.RESET, requests, AsyncState.WAITING_RESET)

    def reset_wait(self, timeout: float | None) -> dict[str, Any]:
        """Writes the reset envs' observations into the batch buffer and returns their infos; raises
        an env's exception after the others' results are written."""
        replies = self._wait("reset_wait", timeout)
        buffer = self._pool.buffer  # after the wait: a restart may have moved it
        infos: dict[str, Any] = {}
        for _, reply in replies:
            if reply["kind"] != m.RESULT:
                continue
            env_ids = reply["envs"]
            buffer.write(env_ids, reply["obs"])
            buffer.terminations[env_ids] = buffer.truncations[env_ids] = self._shared.ended[env_ids] = False
            infos = info_codec.add_block(infos, reply["infos"], env_ids, self.num_envs)
        raise_env_errors(replies)
        return infos

    # ----------------------------------------------------------------- step

    def step(self, leaves: list[Any]) -> None:
        """Sends every worker the actions of its envs (the leaves of a checked batch of actions), or
        the autoreset step it owes after a restart."""
        buffer = self._pool.buffer
        buffer.write_actions(slice(None), leaves)
        resets = self._reset_at_next_step
        requests = {}
        for worker in self._workers:
            if worker in resets:
                requests[worker] = {"envs": worker.env_list, "seeds": [None] * len(worker.env_ids), "options": None}
            else:
                rows = slice(worker.env_ids.start, worker.env_ids.stop)
                actions = buffer.action_payload(leaves, rows, worker.shared_memory)
                requests[worker] = {"envs": worker.env_list, "actions": actions}
        kind = {worker: m.RESET if worker in resets else m.STEP for worker in requests} if resets else m.STEP
        self._send(kind, requests, AsyncState.WAITING_STEP)

    def step_wait(self, timeout: float | None) -> dict[str, Any]:
        """Writes the steps' results into the batch buffer and returns their infos; raises an env's
        exception after the others' results are written."""
        autoreset_steps = self._reset_at_next_step
        replies = self._wait("step_wait", timeout)  # if it fails, the next step resets them (again: harmless)
        self._reset_at_next_step = set()
        buffer = self._pool.buffer  # after the wait: a restart may have moved it
        infos: dict[str, Any] = {}
        for worker, reply in replies:
            if reply["kind"] != m.RESULT:
                continue
            rows = slice(worker.env_ids.start, worker.env_ids.stop)
            if worker in autoreset_steps and not reply.get("restarted"):
                buffer.rewards[rows], buffer.terminations[rows], buffer.truncations[rows] = 0, 0, 0
            else:
                buffer.write_results(rows, reply)
            if reply.get("restarted") and self._autoreset_mode == AutoresetMode.NEXT_STEP:
                self._reset_at_next_step.add(worker)
            buffer.write(rows, reply["obs"])
            block_infos = reply["infos"]
            if reply.get("restarted") and self._autoreset_mode == AutoresetMode.SAME_STEP:
                block_infos = self._restart_final_infos(worker, block_infos)
            if block_infos:  # most steps of most envs have none
                infos = info_codec.add_block(infos, block_infos, worker.env_ids, self.num_envs)
        self._shared.ended[:] = buffer.terminations | buffer.truncations
        raise_env_errors(replies)
        return infos

    def _restart_final_infos(self, worker: WorkerHandle, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Restarted envs' infos under SAME_STEP, where a truncated env's info holds its final_obs
        and final_info, as Gymnasium's: a learner reads them for every truncated env. The lost
        episode's last observation is gone, so final_obs is the new episode's first (the one
        returned) and final_info is empty; info["envfarm_restarted"] tells them apart."""
        first_obs = iterate(self._observation_space, self._pool.buffer.rows(list(worker.env_ids)))
        return [{"final_obs": obs, "final_info": {}, **info} for obs, info in zip(first_obs, infos)]

    # ----------------------------------------------------------------- call, attributes

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Sends the call of `name` to every env."""
        self._send(
            m.CALL,
            {worker: {"name": name, "args": list(args), "kwargs": kwargs} for worker in self._workers},
            AsyncState.WAITING_CALL,
        )

    def call_wait(self, timeout: float | None) -> tuple[Any, ...]:
        """The call's results, one per env."""
        replies = self._wait("call_wait", timeout)
        raise_env_errors(replies)
        return tuple(value for _, reply in replies for value in reply["values"])

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...]) -> None:
        """Sets the attribute `name` of env i to values[i], and waits until it is done."""
        requests = {
            worker: {"name": name, "values": list(values[worker.env_ids.start : worker.env_ids.stop])}
            for worker in self._workers
        }
        self._send(m.SET_ATTR, requests, AsyncState.WAITING_CALL)
        raise_env_errors(self._wait("set_attr", None))

    # ----------------------------------------------------------------- requests

    def _send(
        self, kind: str | dict[WorkerHandle, str], requests: dict[WorkerHandle, dict[str, Any]], state: AsyncState
    ) -> None:
        """Fans one request out to its workers (all sends before any reply is awaited)."""
        try:
            rid = self._pool.send(kind, requests)
        except FarmError as e:
            self._shared.failure = e
            raise
        self.pending = (rid, list(requests))
        self.state = state

    def _wait(self, name: str, timeout: float | None) -> list[tuple[WorkerHandle, dict[str, Any]]]:
        """Gathers the pending request's replies in worker order; the state returns to DEFAULT. Under
        the restart policy, a step's envs lost with their worker are reported truncated."""
        rid, targets = self.pending
        try:
            replies, restarted = self._pool.wait(rid, targets, timeout, restart=name in ("step_wait", "reset_wait"))
        except multiprocessing.TimeoutError:
            raise multiprocessing.TimeoutError(
                f"The call to `{name}` has timed out after {timeout} second(s)."
            ) from None
        except FarmError as e:
            self._shared.failure = e
            raise
        finally:
            self.state, self.pending = AsyncState.DEFAULT, None
        if name == "step_wait" and restarted:
            replies = [(w, _truncated_by_restart(r) if w in restarted else r) for w, r in replies]
        return replies


def _truncated_by_restart(reset_reply: dict[str, Any]) -> dict[str, Any]:
    """The step result of envs that were lost and built again: truncated, with their reset's observation."""
    count = len(reset_reply["envs"])
    return {
        **reset_reply,
        "rewards": np.zeros(count, np.float64),
        "terminated": np.zeros(count, np.bool_),
        "truncated": np.ones(count, np.bool_),
        "infos": [{**info, "envfarm_restarted": True} for info in info_codec.unbatch(reset_reply["infos"], count)],
        "restarted": True,
    }
