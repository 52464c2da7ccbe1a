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
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import Env, Space, logger
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError, ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import iterate

from envfarm.client.batch_buffer import BatchBuffer, takes_unchanged
from envfarm.client.checks import STANDARD_LEAVES, action_leaves, check_reset_mask, choose_spaces, worker_count
from envfarm.client.errors import FarmError
from envfarm.client.send_recv import SendRecv
from envfarm.client.worker_handle import WorkerHandle
from envfarm.client.worker_pool import DEFAULT_STARTUP_TIMEOUT, WorkerPool, raise_env_errors
from envfarm.protocol import infos as info_codec
from envfarm.protocol import messages as m
from envfarm.protocol import spaces as space_codec
from envfarm.transport.cpus import available_cpus

DEFAULT_CLOSE_TIMEOUT = 5.0
_CALL_RESERVED = ("reset", "step", "close", "set_attr")


class FarmVectorEnv(SendRecv, VectorEnv):
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
        broker: A farm broker's endpoint (e.g. "tcp://head:5555"): lease workers there instead of
            starting local ones. Use `envfarm.make_vec(..., broker=...)`, which sets `remote_env`.
        remote_env: {"env_id", "kwargs"}: how farm workers build the envs (they take no code).
        listen: "host" or "host:port" where the leased farm workers reach this trainer (they
            connect to it directly; the broker only introduces them). Default: this host's
            address on its route to the broker, and a free port.
        curve: (this trainer's secret key file, the broker's public key file): CurveZMQ to the
            broker and to the leased workers (see transport/curve.py).
        on_failure: "raise" (default): a lost worker raises WorkerDiedError. "restart" (farm
            only): its envs are built again on another leased worker and reset; that step or
            reset reports them truncated=True with info["envfarm_restarted"] (their last
            observation is gone: the one returned begins the new episode; under SAME_STEP it
            is also their info["final_obs"], with an empty final_info; under NEXT_STEP their
            next step is the autoreset step, as after any end: a reset, reward 0). The
            send/recv API does not restart: there a lost worker raises WorkerDiedError. At most
            5 restarts a minute (RESTARTS_PER_MINUTE, client/worker_pool.py), then WorkerDiedError.
        startup_timeout: Seconds to wait for the workers to start and build their envs.

    Raises:
        RuntimeError: If the sub-environments' spaces are not compatible (as AsyncVectorEnv).
        ValueError: For an empty `env_fns` or inconsistent worker sizing.
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
        broker: str | None = None,
        remote_env: dict[str, Any] | None = None,
        listen: str | None = None,
        curve: tuple[str, str] | None = None,
        on_failure: str = "raise",
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
        self.broker = broker
        if broker is not None and (remote_env is None or inline_worker):
            raise ValueError(
                "a farm (broker=...) builds registered envs by id: use envfarm.make_vec(env_id, n, broker=...), without inline_worker"
            )
        if on_failure not in ("raise", "restart"):
            raise ValueError(f"on_failure must be 'raise' or 'restart', got {on_failure!r}")
        if on_failure == "restart" and broker is None:
            raise ValueError(
                "on_failure='restart' needs a farm (broker=...): a local worker's death is a bug to see, not to hide"
            )
        self.on_failure = on_failure

        self._state = AsyncState.DEFAULT
        self._pending: tuple[int, list[WorkerHandle]] | None = None
        self._failure: FarmError | None = None
        self._pool = WorkerPool(
            self.env_fns,
            self.autoreset_mode.value,
            broker=broker,
            remote_env=remote_env,
            listen=listen,
            curve=curve,
            on_failure=on_failure,
        )
        self._router, self._workers = self._pool.router, self._pool.workers
        try:
            with self._router.patience(startup_timeout):  # farm workers building envs send no heartbeats
                self._start(startup_timeout)
        except BaseException:
            self._pool.release()
            raise
        self._autoreset_envs = np.zeros(self.num_envs, np.bool_)
        # Workers restarted under NEXT_STEP: their envs were reported truncated, so their next step
        # is the autoreset step Gymnasium makes after every end (a reset, reward 0, no end).
        self._reset_at_next_step: set[WorkerHandle] = set()
        self._worker_of_env = np.concatenate([np.full(len(w.env_ids), w.index) for w in self._workers])
        self._init_send_recv(batch_size)
        _warn_of_oversubscription(sum(worker.process is not None for worker in self._workers))

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
        if self.shared_memory and any(
            not isinstance(leaf, STANDARD_LEAVES) for leaf in space_codec.leaves(self.single_observation_space)
        ):
            raise ValueError(  # AsyncVectorEnv's words: Gymnasium cannot put a custom space in shared memory either
                "Using `AsyncVector(..., shared_memory=True)` caused an error, you can disable this feature with `shared_memory=False` however this is slower."
            )
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
        self._assert_idle("reset_async")
        reset_mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)  # Gymnasium pops the mask out of the caller's own dict; we do not
            reset_mask = check_reset_mask(options.pop("reset_mask"), self.num_envs)
        requests = {}
        for worker in self._workers:
            env_ids = [i for i in worker.env_ids if reset_mask is None or reset_mask[i]]
            if env_ids:
                requests[worker] = {"envs": env_ids, "seeds": [seed[i] for i in env_ids], "options": options}
            if len(env_ids) == len(worker.env_ids):
                self._reset_at_next_step.discard(worker)  # reset now: no autoreset step owed
        self._send(m.RESET, requests, AsyncState.WAITING_RESET)

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Waits for the resets sent by `reset_async`.

        Raises:
            NoAsyncCallError: Without a prior `reset_async`.
            multiprocessing.TimeoutError: After `timeout` seconds (None: no limit); the late replies are dropped.
        """
        self._assert_is_running()
        self._assert_waiting(AsyncState.WAITING_RESET, "reset_wait", "reset_async")
        replies = self._wait("reset_wait", timeout)
        infos: dict[str, Any] = {}
        for _, reply in replies:
            if reply["kind"] != m.RESULT:
                continue
            env_ids = reply["envs"]
            self._buffer.write(env_ids, reply["obs"])
            self._buffer.terminations[env_ids] = self._buffer.truncations[env_ids] = self._autoreset_envs[env_ids] = (
                False
            )
            infos = info_codec.add_block(infos, reply["infos"], env_ids, self.num_envs)
        raise_env_errors(replies)
        return self._buffer.batch(self.copy), infos

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
        self._assert_idle("step_async")
        leaves = action_leaves(self.single_action_space, actions, self.num_envs)
        if self.autoreset_mode == AutoresetMode.DISABLED and self._autoreset_envs.any():
            ended = np.flatnonzero(self._autoreset_envs).tolist()
            raise ResetNeeded(
                f"envs {ended} terminated or truncated and autoreset_mode is DISABLED: reset them with "
                "`reset(options={'reset_mask': mask})` before the next step"
            )
        self._buffer.write_actions(slice(None), leaves)
        resets = self._reset_at_next_step
        requests = {}
        for worker in self._workers:
            if worker in resets:
                requests[worker] = {"envs": worker.env_list, "seeds": [None] * len(worker.env_ids), "options": None}
            else:
                rows = slice(worker.env_ids.start, worker.env_ids.stop)
                requests[worker] = {"envs": worker.env_list, "actions": self._action_payload(worker, leaves, rows)}
        kind = {worker: m.RESET if worker in resets else m.STEP for worker in requests} if resets else m.STEP
        self._send(kind, requests, AsyncState.WAITING_STEP)

    def _action_payload(self, worker: WorkerHandle, leaves: list[Any], rows: slice | list[int]) -> list[Any]:
        """A worker's rows of each action leaf; None where it reads them from the shared batch buffer."""
        return [
            None
            if worker.shared_memory and takes_unchanged(shared, leaf)
            else (leaf[rows] if isinstance(leaf, np.ndarray) else [leaf[i] for i in _indices(rows, len(leaf))])
            for leaf, shared in zip(leaves, self._buffer.actions)
        ]

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
        autoreset_steps = self._reset_at_next_step
        replies = self._wait("step_wait", timeout)  # if it fails, the next step resets them (again: harmless)
        self._reset_at_next_step = set()
        infos: dict[str, Any] = {}
        for worker, reply in replies:
            if reply["kind"] != m.RESULT:
                continue
            rows = slice(worker.env_ids.start, worker.env_ids.stop)
            if worker in autoreset_steps and not reply.get("restarted"):
                self._buffer.rewards[rows], self._buffer.terminations[rows], self._buffer.truncations[rows] = 0, 0, 0
            else:
                self._buffer.write_results(rows, reply)
            if reply.get("restarted") and self.autoreset_mode == AutoresetMode.NEXT_STEP:
                self._reset_at_next_step.add(worker)
            self._buffer.write(rows, reply["obs"])
            block_infos = reply["infos"]
            if reply.get("restarted") and self.autoreset_mode == AutoresetMode.SAME_STEP:
                block_infos = self._restart_final_infos(worker, block_infos)
            if block_infos:  # most steps of most envs have none
                infos = info_codec.add_block(infos, block_infos, worker.env_ids, self.num_envs)
        buffer = self._buffer
        self._autoreset_envs = buffer.terminations | buffer.truncations
        raise_env_errors(replies)
        return (
            buffer.batch(self.copy),
            buffer.rewards.copy(),
            buffer.terminations.copy(),
            buffer.truncations.copy(),
            infos,
        )

    def _restart_final_infos(self, worker: WorkerHandle, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Restarted envs' infos under SAME_STEP, where a truncated env's info holds its final_obs
        and final_info, as Gymnasium's: a learner reads them for every truncated env. The lost
        episode's last observation is gone, so final_obs is the new episode's first (the one
        returned) and final_info is empty; info["envfarm_restarted"] tells them apart."""
        first_obs = iterate(self.observation_space, self._buffer.rows(list(worker.env_ids)))
        return [{"final_obs": obs, "final_info": {}, **info} for obs, info in zip(first_obs, infos)]

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
        self._assert_idle("call_async")
        if name in _CALL_RESERVED:
            raise ValueError(f"Trying to call function `{name}` with `call`, use `{name}` directly instead.")
        self._send(
            m.CALL,
            {worker: {"name": name, "args": list(args), "kwargs": kwargs} for worker in self._workers},
            AsyncState.WAITING_CALL,
        )

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Waits for the calls sent by `call_async` and returns one result per env."""
        self._assert_is_running()
        self._assert_waiting(AsyncState.WAITING_CALL, "call_wait", "call_async")
        replies = self._wait("call_wait", timeout)
        raise_env_errors(replies)
        return tuple(value for _, reply in replies for value in reply["values"])

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
        self._assert_idle("set_attr")
        requests = {
            worker: {"name": name, "values": list(values[worker.env_ids.start : worker.env_ids.stop])}
            for worker in self._workers
        }
        self._send(m.SET_ATTR, requests, AsyncState.WAITING_CALL)
        raise_env_errors(self._wait("set_attr", None))

    # ----------------------------------------------------------------- close

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Closes the envs and stops the workers, within `timeout` seconds (None: 5 s).

        A pending call is awaited first; workers that do not finish in time (a hung env) are
        killed. With `terminate=True` they are killed at once. Shared memory is always unlinked.
        """
        timeout = DEFAULT_CLOSE_TIMEOUT if timeout is None else timeout
        if self._state != AsyncState.DEFAULT:  # as AsyncVectorEnv says, terminating or not
            logger.warn(f"Calling `close` while waiting for a pending call to `{self._state.value}` to complete.")
        try:
            if not terminate and self._failure is None:
                self._pool.close(self._pending if self._state != AsyncState.DEFAULT else None, timeout)
        except (multiprocessing.TimeoutError, FarmError) as e:
            logger.warn(f"envfarm: closing did not finish cleanly ({type(e).__name__}: {e}); killing the workers")
        finally:
            self._pool.release()

    # ----------------------------------------------------------------- helpers

    @property
    def _buffer(self) -> BatchBuffer:
        return self._pool.buffer

    def _assert_idle(self, call: str) -> None:
        """The guard of every synchronous-API call that starts something: AlreadyPendingCallError
        while a call or a send/recv is pending."""
        self._assert_no_pending_call(call)
        self._assert_no_send_recv(call)

    def _assert_no_pending_call(self, call: str) -> None:
        """AlreadyPendingCallError, worded as AsyncVectorEnv words it, while a call is pending."""
        if self._state != AsyncState.DEFAULT:
            period = "" if call == "reset_async" else "."  # AsyncVectorEnv's reset_async says it without one
            raise AlreadyPendingCallError(
                f"Calling `{call}` while waiting for a pending call to `{self._state.value}` to complete{period}",
                str(self._state.value),
            )

    def _assert_waiting(self, state: AsyncState, call: str, starter: str) -> None:
        """The guard of every `*_wait`: NoAsyncCallError without its `*_async` first."""
        if self._state != state:
            raise NoAsyncCallError(f"Calling `{call}` without any prior call to `{starter}`.", state.value)

    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")
        if self._failure is not None:
            raise type(self._failure)(f"{self._failure}; close() this vector env and make a new one")

    def _send(
        self, kind: str | dict[WorkerHandle, str], requests: dict[WorkerHandle, dict[str, Any]], state: AsyncState
    ) -> None:
        """Fans one request out to its workers (all sends before any reply is awaited)."""
        try:
            rid = self._pool.send(kind, requests)
        except FarmError as e:
            self._failure = e
            raise
        self._pending = (rid, list(requests))
        self._state = state

    def _wait(self, name: str, timeout: float | None) -> list[tuple[WorkerHandle, dict[str, Any]]]:
        """Gathers the pending request's replies in worker order; the state returns to DEFAULT. Under
        the restart policy, a step's envs lost with their worker are reported truncated."""
        rid, targets = self._pending
        try:
            replies, restarted = self._pool.wait(rid, targets, timeout, restart=name in ("step_wait", "reset_wait"))
        except multiprocessing.TimeoutError:
            raise multiprocessing.TimeoutError(
                f"The call to `{name}` has timed out after {timeout} second(s)."
            ) from None
        except FarmError as e:
            self._failure = e
            raise
        finally:
            self._state, self._pending = AsyncState.DEFAULT, None
        if name == "step_wait" and restarted:
            replies = [(w, _truncated_by_restart(r) if w in restarted else r) for w, r in replies]
        return replies


_warned_of_oversubscription = False


def _warn_of_oversubscription(local_workers: int) -> None:
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


def _indices(rows: slice | list[int], length: int) -> range | list[int]:
    return range(length)[rows] if isinstance(rows, slice) else rows
