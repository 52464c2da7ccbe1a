"""FarmVectorEnv: a drop-in for gymnasium.vector.AsyncVectorEnv, over ZeroMQ.

Same constructor, methods, attributes, error classes and messages as AsyncVectorEnv (gymnasium
1.x); results step for step identical to SyncVectorEnv. What differs, on purpose:

- Envs are batched: each worker process hosts a contiguous block of envs and gets one message per
  step, and all messages go out before any reply is awaited.
- A reply carries its request's id; a late reply after a `*_wait` timeout is dropped, never
  returned for the next call.
- An exception in one env is raised here with that env's class and message (the remote
  traceback as a note); the worker and the other envs live on, and resetting the failed env
  makes it usable again.
- A worker that dies is reported at once as WorkerDiedError naming it and its envs.
- Text/Sequence/OneOf observations travel as data even with shared memory on, so they update.
- `close()` is bounded in time: after `timeout` (default 5 s) the workers are killed.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import Env, Space, logger
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError, ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.async_vector_env import AsyncState

from envfarm.client.checks import (
    action_leaves,
    check_reset_mask,
    check_shared_memory,
    choose_spaces,
    warn_of_oversubscription,
    worker_count,
)
from envfarm.client.errors import FarmError
from envfarm.client.farm import Farm
from envfarm.client.lockstep import Lockstep
from envfarm.client.send_recv import SendRecv
from envfarm.client.shared_state import SharedState
from envfarm.client.worker_pool import DEFAULT_STARTUP_TIMEOUT, WorkerPool
from envfarm.protocol import spaces as space_codec

DEFAULT_CLOSE_TIMEOUT = 5.0
_CALL_RESERVED = ("reset", "step", "close", "set_attr")
_SEND_RECV_CALLS = ("async_reset", "send", "recv")  # these may start while other envs are in flight


class FarmVectorEnv(VectorEnv):
    """Runs envs in worker processes that talk ZeroMQ, sharing observations through shared memory.

    Example:
        >>> import gymnasium as gym, envfarm
        >>> envs = envfarm.FarmVectorEnv([lambda: gym.make("CartPole-v1")] * 4)
        >>> obs, info = envs.reset(seed=0)
        >>> envs.close()

    Args:
        env_fns: Functions that create the environments; they run in the worker processes.
        shared_memory: Let same-host workers write observations straight into a shared batch
            buffer (each worker proves it can reach it first; otherwise its observations travel
            on the socket).
        copy: Return a copy of the observations from `reset` and `step`, else a view of the buffer.
        context: The `multiprocessing` start method for workers ("fork", "spawn", "forkserver").
        daemon: Start workers as daemonic processes (they cannot have children of their own).
        worker: Not supported (envfarm runs its own worker); must be None.
        observation_mode: "same", "different", or a (batched, single) pair of spaces, as in Gymnasium.
        autoreset_mode: NEXT_STEP (default), SAME_STEP or DISABLED, exactly as Gymnasium.
        max_concurrency: At most this many envs step at once, i.e. at most this many workers.
        num_workers: Worker processes to start; default: the CPUs this process may use, at most
            one per env. Mutually exclusive with `envs_per_worker`.
        envs_per_worker: Envs each worker hosts; sets `num_workers` to ceil(num_envs / this).
        batch_size: How many envs `recv` returns (the send/recv API, see client/send_recv.py);
            default num_envs.
        inline_worker: Serve the last worker's block of envs in this process, stepped while
            the other workers step theirs. Faster for cheap envs when every CPU has a worker, but
            those envs share the trainer's fate: a crash or hang there is the trainer's.
        startup_timeout: Seconds to wait for the workers to start and build their envs.
        farm: Lease the workers from a farm broker instead of starting local ones (see
            client/farm.py). `envfarm.make_vec(env_id, n, broker=...)` makes it.

    Raises:
        RuntimeError: If the sub-environments' spaces are not compatible (as AsyncVectorEnv).
        ValueError: For an empty `env_fns`, inconsistent worker sizing, or a `farm` with `inline_worker`.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        shared_memory: bool = True,
        copy: bool = True,
        context: str | None = None,
        daemon: bool = True,
        worker: None = None,
        observation_mode: str | tuple[Space, Space] = "same",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        max_concurrency: int | None = None,
        *,
        num_workers: int | None = None,
        envs_per_worker: int | None = None,
        batch_size: int | None = None,
        inline_worker: bool = False,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        farm: Farm | None = None,
    ) -> None:
        if worker is not None:
            raise ValueError("FarmVectorEnv runs envfarm's own worker; a custom `worker` function is not supported")
        self.env_fns = list(env_fns)
        if not self.env_fns:
            raise ValueError("FarmVectorEnv needs at least one env_fn, got an empty sequence")
        self.num_envs = len(self.env_fns)
        self.shared_memory = shared_memory
        self.copy = copy
        self.context = context
        self.daemon = daemon
        self.observation_mode = observation_mode
        self.autoreset_mode = (
            autoreset_mode if isinstance(autoreset_mode, AutoresetMode) else AutoresetMode(autoreset_mode)
        )
        self.max_concurrency = max_concurrency
        self.num_workers = worker_count(self.num_envs, num_workers, envs_per_worker, max_concurrency)
        self.inline_worker = inline_worker
        self.farm = farm
        if farm is not None and inline_worker:
            raise ValueError(
                "inline_worker=True serves a block of envs in this process, and a farm's envs all run on its workers: "
                "pass farm or inline_worker, not both"
            )

        # What the reset/step/call API (Lockstep) and send/recv (SendRecv) both read and write.
        self._shared = SharedState(self.num_envs)
        self._pool = WorkerPool(self.env_fns, self.autoreset_mode.value, **(farm.pool_options() if farm else {}))
        self._router, self._workers = self._pool.router, self._pool.workers
        try:
            with self._router.patience(startup_timeout):  # farm workers building envs send no heartbeats
                self._start(startup_timeout)
        except BaseException:
            self._pool.release()
            raise
        self._lockstep = Lockstep(self._pool, self._shared, self.autoreset_mode, self.observation_space)
        self._send_recv = SendRecv(self._pool, self._shared, self.single_action_space, self.autoreset_mode, batch_size)
        warn_of_oversubscription(sum(worker.process is not None for worker in self._workers))

    # ----------------------------------------------------------------- start-up

    def _start(self, timeout: float) -> None:
        """Starts the workers, takes the spaces from their envs, and sets up the batch buffer."""
        created = self._pool.start(
            self.num_envs, self.num_workers, self.inline_worker, self.context, self.daemon, timeout
        )
        self.num_workers = len(self._workers)
        obs_spaces, action_spaces = [], []
        for _, reply in created:
            for obs_space, action_space in reply["spaces"]:
                obs_spaces.append(space_codec.decode_space(obs_space))
                action_spaces.append(space_codec.decode_space(action_space))
        first = created[0][1]
        self.metadata = dict(first["metadata"])
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = first["render_mode"]
        self.single_observation_space, self.observation_space, self.single_action_space, self.action_space = (
            choose_spaces(type(self).__name__, self.observation_mode, obs_spaces, action_spaces)
        )
        check_shared_memory(self.single_observation_space, self.shared_memory)
        self._pool.share(self.single_observation_space, self.single_action_space, self.shared_memory, timeout)

    # ----------------------------------------------------------------- reset

    @property
    def np_random_seed(self) -> tuple[int, ...]:
        """Returns a tuple of np_random seeds for all the wrapped envs."""
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        """Returns the tuple of the numpy random number generators for the wrapped envs."""
        return self.get_attr("np_random")

    @property
    def processes(self) -> list[multiprocessing.Process]:
        """The worker processes (each hosts a block of envs, unlike AsyncVectorEnv's one per env)."""
        return self._pool.processes

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Resets the sub-environments (all, or those in `options["reset_mask"]`) and returns the batch.

        Args:
            seed: None (random), an int (env i gets seed + i) or a list of one seed per env.
            options: Passed to every env's `reset`; a boolean array under "reset_mask" selects
                which envs to reset. The caller's dict is left unchanged.
        """
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None) -> None:
        """Sends the reset requests; `reset_wait` collects the results."""
        self._assert_is_running()
        if seed is None:
            seed = [None for _ in range(self.num_envs)]
        elif isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(
                f"If seeds are passed as a list the length must match num_envs={self.num_envs} but got length={len(seed)}."
            )
        self._assert_no_pending_call("reset_async")
        reset_mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)  # Gymnasium pops the mask out of the caller's own dict; we do not
            reset_mask = check_reset_mask(options.pop("reset_mask"), self.num_envs)
        self._lockstep.reset(seed, options, reset_mask)

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Waits for the resets sent by `reset_async`.

        Raises:
            NoAsyncCallError: Without a prior `reset_async`.
            multiprocessing.TimeoutError: After `timeout` seconds (None: no limit); the late replies are dropped.
        """
        self._assert_is_running()
        self._assert_waiting(AsyncState.WAITING_RESET, "reset_wait", "reset_async")
        infos = self._lockstep.reset_wait(timeout)
        return self._pool.buffer.batch(self.copy), infos

    # ----------------------------------------------------------------- step

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Steps every sub-environment with its action and returns the batched results."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Sends each worker the actions of its envs; `step_wait` collects the results.

        Raises:
            ValueError: If `actions` is not a batch of `single_action_space` of size `num_envs`.
            gymnasium.error.ResetNeeded: With autoreset_mode DISABLED, if an env that ended has
                not been reset (nothing is stepped then).
        """
        self._assert_is_running()
        self._assert_no_pending_call("step_async")
        leaves = action_leaves(self.single_action_space, actions, self.num_envs)
        if self.autoreset_mode == AutoresetMode.DISABLED and self._shared.ended.any():
            ended = np.flatnonzero(self._shared.ended).tolist()
            raise ResetNeeded(
                f"envs {ended} terminated or truncated and autoreset_mode is DISABLED: reset them with "
                "`reset(options={'reset_mask': mask})` before the next step"
            )
        self._lockstep.step(leaves)

    def step_wait(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Waits for the steps sent by `step_async`.

        Raises:
            NoAsyncCallError: Without a prior `step_async`.
            multiprocessing.TimeoutError: After `timeout` seconds (None: no limit); the late replies are dropped.
            The env's own exception class: If an env raised; the others' results are kept and the
                failed env works again after it is reset.
        """
        self._assert_is_running()
        self._assert_waiting(AsyncState.WAITING_STEP, "step_wait", "step_async")
        infos = self._lockstep.step_wait(timeout)
        buffer = self._pool.buffer  # after the wait: a restart may have moved it
        return (
            buffer.batch(self.copy),
            buffer.rewards.copy(),
            buffer.terminations.copy(),
            buffer.truncations.copy(),
            infos,
        )

    # ----------------------------------------------------------------- call, attributes, render

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Calls the method `name` (or reads the attribute) of every sub-environment."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def render(self) -> tuple[Any, ...] | None:
        """Returns the rendered frames from the environments."""
        return self.call("render")

    def call_async(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        """Sends the call of `name` to every sub-environment; `call_wait` collects the results."""
        self._assert_is_running()
        self._assert_no_pending_call("call_async")
        if name in _CALL_RESERVED:
            raise ValueError(f"Trying to call function `{name}` with `call`, use `{name}` directly instead.")
        self._lockstep.call(name, args, kwargs)

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Waits for the calls sent by `call_async` and returns one result per env."""
        self._assert_is_running()
        self._assert_waiting(AsyncState.WAITING_CALL, "call_wait", "call_async")
        return self._lockstep.call_wait(timeout)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Gets the attribute `name` of every sub-environment."""
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | object) -> None:
        """Sets the attribute `name` of every sub-environment: one value for all, or one per env."""
        self._assert_is_running()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of environments. "
                f"Got `{len(values)}` values for {self.num_envs} environments."
            )
        self._assert_no_pending_call("set_attr")
        self._lockstep.set_attr(name, values)

    # ----------------------------------------------------------------- send/recv (client/send_recv.py)

    @property
    def batch_size(self) -> int:
        """How many envs `recv` returns (the constructor's `batch_size`, default num_envs)."""
        return self._send_recv.batch_size

    def async_reset(
        self,
        seed: int | list[int | None] | None = None,
        options: dict[str, Any] | None = None,
        env_ids: Sequence[int] | None = None,
    ) -> None:
        """Resets the envs `env_ids` (default: all); their first observations come from `recv`.

        Args:
            seed: None, an int (env i gets seed + i, i its index in the vector env) or one per env in `env_ids`.
            options: Passed to each env's reset.
            env_ids: Which envs; each must be idle (not sent and not waiting to be received).
        """
        self._assert_is_running()
        self._assert_no_pending_call("async_reset")
        self._send_recv.async_reset(seed, options, env_ids)

    def send(self, actions: Any, env_ids: Sequence[int] | np.ndarray) -> None:
        """Steps the envs `env_ids` with `actions` (a batch of `len(env_ids)` actions, row j for env_ids[j]).

        Raises:
            ValueError: If an env is not idle (already sent, or its result not yet received),
                or the actions do not match the action space.
            gymnasium.error.ResetNeeded: With autoreset_mode DISABLED, for an env that ended.
        """
        self._assert_is_running()
        self._assert_no_pending_call("send")
        self._send_recv.send(actions, env_ids)

    def recv(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Returns (obs, rewards, terminated, truncated, info) of the first `batch_size` envs that are ready.

        `info["env_id"]` holds the env index of each row. If an env raised, its exception is
        raised here (with `failed_envs`); the other ready envs stay ready for the next `recv`,
        and the failed env is idle again, to be reset with `async_reset(env_ids=[...])`.

        Raises:
            multiprocessing.TimeoutError: After `timeout` seconds; nothing is lost, recv again.
            RuntimeError: If fewer than `batch_size` envs are running or ready, so none could come.
        """
        self._assert_is_running()
        self._assert_no_pending_call("recv")
        return self._send_recv.recv(timeout)

    # ----------------------------------------------------------------- close

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Closes the envs and stops the workers, within `timeout` seconds (None: 5 s).

        A pending call is awaited first; workers that do not finish in time (a hung env) are
        killed. With `terminate=True` they are killed at once. Shared memory is always unlinked.
        """
        timeout = DEFAULT_CLOSE_TIMEOUT if timeout is None else timeout
        state = self._lockstep.state
        if state != AsyncState.DEFAULT:  # as AsyncVectorEnv says, terminating or not
            logger.warn(f"Calling `close` while waiting for a pending call to `{state.value}` to complete.")
        try:
            if not terminate and self._shared.failure is None:
                self._pool.close(self._lockstep.pending, timeout)
        except (multiprocessing.TimeoutError, FarmError) as e:
            logger.warn(f"envfarm: closing did not finish cleanly ({type(e).__name__}: {e}); killing the workers")
        finally:
            self._pool.release()

    # ----------------------------------------------------------------- helpers

    def _assert_no_pending_call(self, call: str) -> None:
        """The one guard against overlapping calls, at every call that starts something. While a
        reset/step/call is pending, nothing else starts (AlreadyPendingCallError, worded as
        AsyncVectorEnv words it); while envs are in flight with send/recv, nothing of the
        reset/step/call API starts (send/recv's own calls then check their envs one by one)."""
        state = self._lockstep.state
        if state != AsyncState.DEFAULT:
            period = "" if call == "reset_async" else "."  # AsyncVectorEnv's reset_async says it without one
            raise AlreadyPendingCallError(
                f"Calling `{call}` while waiting for a pending call to `{state.value}` to complete{period}",
                str(state.value),
            )
        if call not in _SEND_RECV_CALLS and self._send_recv.busy:
            raise AlreadyPendingCallError(
                f"Calling `{call}` while envs are in flight with send/recv: recv their results first.", "send"
            )

    def _assert_waiting(self, state: AsyncState, call: str, starter: str) -> None:
        """The guard of every `*_wait`: NoAsyncCallError without its `*_async` first."""
        if self._lockstep.state != state:
            raise NoAsyncCallError(f"Calling `{call}` without any prior call to `{starter}`.", state.value)

    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")
        if self._shared.failure is not None:
            raise type(self._shared.failure)(f"{self._shared.failure}; close() this vector env and make a new one")
