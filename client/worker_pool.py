"""The workers behind one FarmVectorEnv: started here or leased from a farm, and what they share.

A WorkerPool owns everything a vector env holds outside its own process: the trainer's data
socket (client/router.py), the worker handles, the shared batch buffer and the same-host
channels, the broker link and its restarts. It speaks the protocol's requests and replies, never
Gymnasium's API: FarmVectorEnv (client/vector_env.py) turns its calls into requests and the
replies into batches.

Its life: `start` (start or lease the workers; HELLO, CREATE), `share` (the batch buffer and the
channels; ATTACH), then any number of `send` and `wait` (a lost worker restarted in `wait` under
the restart policy), then `close` and `release`.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
from gymnasium import Env, Space, logger

from envfarm.client.batch_buffer import BatchBuffer
from envfarm.client.broker_link import BrokerClient, farm_endpoint
from envfarm.client.errors import FarmError, WorkerDiedError, raise_env_errors
from envfarm.client.launch import partition, start_local_workers
from envfarm.client.router import Router
from envfarm.client.routes import InlineRoute
from envfarm.client.worker_handle import WorkerHandle
from envfarm.protocol import messages as m
from envfarm.protocol import spaces as space_codec
from envfarm.protocol.errors import ErrorInfo
from envfarm.server import RequestHandler
from envfarm.transport.channel import TrainerChannels
from envfarm.transport.channel import available as channel_available
from envfarm.transport.curve import load_key_pair, load_public_key
from envfarm.transport.segments import Segment

RESTARTS_PER_MINUTE = 5
# Busy-wait budgets on the shared-memory channel before sleeping on a futex: on the 2-core VM this
# was tuned on, waking a sleeping process costs 40-90 us, more than a cheap env's whole step. A
# worker spins for the trainer's next request (its post-processing, or its own inline envs), the
# trainer for the workers' replies. `python3 docs/measure/spin.py` (medians of 3 interleaved runs,
# ratio to SyncVectorEnv): worker budget 100 us -> 1 ms took CartPole x16 from 0.63 to 0.72 and
# HalfCheetah x8 from 0.48 to 0.84.
WORKER_SPIN_SECONDS = 1e-3
TRAINER_SPIN_SECONDS = 200e-6
DEFAULT_STARTUP_TIMEOUT = 120.0
CONNECT_TIMEOUT = 15.0  # seconds a leased farm worker has to connect to the trainer (it takes milliseconds)

Replies = list[tuple[WorkerHandle, dict[str, Any]]]


class WorkerPool:
    """The workers of one vector env, local (`broker=None`) or leased from the farm at `broker`."""

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        autoreset_mode: str,
        *,
        broker: str | None = None,
        remote_env: dict[str, Any] | None = None,
        listen: str | None = None,
        curve: tuple[str, str] | None = None,
        on_failure: str = "raise",
    ):
        self.env_fns = env_fns
        self.autoreset_mode = autoreset_mode
        self.broker_endpoint = broker
        self.remote_env = remote_env
        self.on_failure = on_failure
        self.broker: BrokerClient | None = None  # in a farm
        if broker is None:
            self.router = Router(f"ipc://@envfarm-{os.getpid()}-{secrets.token_hex(8)}", trusted=True)
        else:
            bind, advertise = farm_endpoint(broker, listen, curve)
            keys = (load_key_pair(curve[0]), load_public_key(curve[1])) if curve is not None else None
            self.router = Router(
                bind, trusted=False, farm=True, advertise=advertise, keys=keys[0] if keys is not None else None
            )
            try:
                self.broker = BrokerClient(broker, keys)
            except BaseException:
                self.router.close()
                raise
        self.workers: list[WorkerHandle] = []  # in env order; a restart replaces an item in place
        self.segments: list[BatchBuffer | TrainerChannels] = []  # the batch buffer first
        self._restarts: collections.deque[float] = collections.deque()
        self.release = weakref.finalize(self, _release, self.router, self.broker, self.workers, self.segments)

    @property
    def buffer(self) -> BatchBuffer:
        """The batch buffer: observations, actions, rewards and ends of every env."""
        return self.segments[0]

    @property
    def processes(self) -> list[multiprocessing.Process]:
        """The local worker processes."""
        return [worker.process for worker in self.workers if worker.process is not None]

    # ----------------------------------------------------------------- start-up

    def start(
        self, num_envs: int, num_workers: int, inline_worker: bool, context: str | None, daemon: bool, timeout: float
    ) -> Replies:
        """Starts (or leases) the workers, each with a contiguous block of envs, and has them build
        their envs; returns the CREATE replies in env order (their spaces, metadata, render mode)."""
        if self.broker is not None:
            self.workers.extend(self._lease(num_envs, timeout))
        else:
            blocks = partition(num_envs, num_workers)
            remote_blocks = blocks[:-1] if inline_worker else blocks
            self.workers.extend(start_local_workers(self.router.endpoint, remote_blocks, context, daemon))
            if inline_worker:
                handler = RequestHandler(trusted=True)
                self.workers.append(WorkerHandle(len(remote_blocks), b"", blocks[-1], route=InlineRoute(handler)))
            for worker in self.workers:
                self.router.add(worker)
        self._await_hellos([w for w in self.workers if not w.inline], timeout)
        created = in_order(
            self.router.ask(m.CREATE, {worker: self._create_fields(worker) for worker in self.workers}, timeout)
        )
        raise_env_errors(created)
        return created

    def share(self, observation_space: Space, action_space: Space, shared_memory: bool, timeout: float) -> None:
        """Makes the batch buffer (in shared memory if `shared_memory`) and the channels, and has
        each worker attach to them; a worker that cannot uses the socket."""
        num_envs = sum(len(worker.env_ids) for worker in self.workers)
        buffer = BatchBuffer(observation_space, action_space, num_envs, shared=shared_memory)
        self.segments.append(buffer)
        channels = self._make_channels(observation_space, action_space) if shared_memory else None
        if buffer.descriptor is None and channels is None:
            return
        requests = {}
        for worker in self.workers:
            channel = (
                None
                if channels is None or worker.inline
                else {**channels.descriptor(worker.index), "spin": WORKER_SPIN_SECONDS}
            )
            requests[worker] = {"obs": buffer.descriptor, "channel": channel}
        for worker, reply in in_order(self.router.ask(m.ATTACH, requests, timeout)):
            attached = reply["kind"] == m.ATTACHED
            worker.shared_memory = attached and reply["obs"]
            on_channel = attached and reply["channel"]
            if on_channel:
                self.router.use_channel(worker, channels)
            # Only a local worker is expected to share memory; a farm worker on another host is not.
            if worker.process is not None and (
                (buffer.descriptor is not None and not worker.shared_memory)
                or (channels is not None and not on_channel)
            ):
                logger.warn(
                    f"envfarm {worker.describe()} cannot use shared memory ({reply.get('reason') or reply.get('error')}); it uses the socket"
                )

    def _await_hellos(self, workers: list[WorkerHandle], timeout: float) -> None:
        """Waits for each worker's HELLO (rid 0). A leased farm worker connects within seconds if
        it can reach this trainer at all: one that has not after CONNECT_TIMEOUT cannot."""
        if self.broker is None:
            self.router.gather(0, workers, timeout)
            return
        within = min(timeout, CONNECT_TIMEOUT)
        try:
            self.router.gather(0, workers, within)
        except multiprocessing.TimeoutError:
            missing = [worker for worker in workers if not worker.connected]
            hosts = ", ".join(sorted({worker.host for worker in missing}))
            raise multiprocessing.TimeoutError(
                f"{len(missing)} leased farm worker(s) (on {hosts}) did not connect to this trainer at {self.router.endpoint} "
                f"within {within:g} s: they cannot reach that address. Pass listen='HOST[:PORT]' with an address of this "
                "host that the workers can route to (and a port open to them)"
            ) from None

    def _create_fields(self, worker: WorkerHandle) -> dict[str, Any]:
        """CREATE for a worker's block: farm workers get the env id, local ones the pickled env_fns."""
        if self.remote_env is not None:
            source = self.remote_env
        else:
            source = {"env_fns": cloudpickle.dumps(self.env_fns[worker.env_ids.start : worker.env_ids.stop])}
        return {"envs": list(worker.env_ids), "source": source, "autoreset_mode": self.autoreset_mode}

    def _lease(self, num_envs: int, timeout: float, first_index: int = 0, add: bool = False) -> list[WorkerHandle]:
        """Leases farm workers for `num_envs` envs and gives each a contiguous block of them, up to
        its slots; the broker tells them to connect to this trainer, and each will say HELLO."""
        lease = {
            "envs": num_envs,
            "env_id": self.remote_env["env_id"],
            "endpoint": self.router.endpoint,
            "server_key": self.router.server_key,
            "add": add,
        }
        try:
            leased, dead_after = self.broker.lease(lease, timeout)
        except multiprocessing.TimeoutError:
            raise multiprocessing.TimeoutError(
                f"no reply from the broker at {self.broker_endpoint} within {timeout} s: is it running, and if it uses "
                "CurveZMQ, is this trainer's public key among its clients (curve=...)?"
            ) from None
        self.router.liveness.dead_after = dead_after
        workers, start = [], first_index
        for identity, slots, host, pid, key in leased:
            block = range(start, min(start + slots, first_index + num_envs))
            if key is not None:
                self.router.admit(key)
            worker = WorkerHandle(
                len(self.workers) + len(workers), identity, block, pid=pid, host=host, last_heard=time.monotonic()
            )
            workers.append(worker)
            self.router.add(worker)
            start = block.stop
        return workers

    def _make_channels(self, observation_space: Space, action_space: Space) -> TrainerChannels | None:
        """Shared-memory mailboxes for the local workers, sized for this env's messages."""
        if not channel_available():
            return None
        block = max(len(worker.env_ids) for worker in self.workers)
        _, obs_bytes = space_codec.shm_layout(observation_space, block)
        _, action_bytes = space_codec.shm_layout(action_space, block)
        capacities = (64 << 10) + 2 * action_bytes, (1 << 20) + 2 * obs_bytes
        segment = Segment(TrainerChannels.size(len(self.workers), *capacities))
        channels = TrainerChannels(segment, len(self.workers), *capacities, TRAINER_SPIN_SECONDS)
        self.segments.append(channels)
        return channels

    # ----------------------------------------------------------------- requests

    def send(self, kind: str | dict[WorkerHandle, str], requests: dict[WorkerHandle, dict[str, Any]]) -> int:
        """Fans one request (of one `kind`, or of each worker's) out to its workers, all sends
        before any reply is awaited; returns its rid.

        Raises:
            FarmError: A worker cannot be sent to (under the restart policy, a lost worker owing a
                STEP or RESET is left for `wait` to restart).
        """
        rid = self.router.new_rid()
        for worker, fields in requests.items():
            worker_kind = kind if isinstance(kind, str) else kind[worker]
            try:
                self.router.send(worker, m.make(worker_kind, rid, **fields))
            except WorkerDiedError:
                if self.on_failure != "restart" or worker_kind not in (m.STEP, m.RESET):
                    raise
        return rid

    def wait(
        self, rid: int, targets: list[WorkerHandle], timeout: float | None, restart: bool = False
    ) -> tuple[Replies, set[WorkerHandle]]:
        """Gathers the replies of request `rid` from `targets`, in their order. With `restart` (and the
        restart policy), a lost worker's envs are built again on a newly leased worker and reset:
        its reply is that RESET's, and it is among the returned set of restarted workers.

        Raises:
            multiprocessing.TimeoutError: After `timeout` seconds (None: no limit).
            FarmError: A worker is lost (and not restarted).
        """
        restart = restart and self.on_failure == "restart"
        lost: list[WorkerHandle] = []
        replies = self.router.collect(
            {worker: rid for worker in targets}, timeout, wait_all=True, lost=lost if restart else None
        )
        if any(worker.shared_memory for worker in lost):
            lost += self._fence(lost)
        restarted = set()
        for worker in lost:
            replacement, reply = self._restart(worker)
            targets = [replacement if target is worker else target for target in targets]
            replies[replacement] = reply
            restarted.add(replacement)
        return [(worker, replies[worker]) for worker in targets], restarted

    def ask(self, kind: str, requests: dict[WorkerHandle, dict[str, Any]], timeout: float) -> Replies:
        """Sends a request and gathers its replies, in env order."""
        return in_order(self.router.ask(kind, requests, timeout))

    def _fence(self, lost: list[WorkerHandle]) -> list[WorkerHandle]:
        """Moves the batch buffer to a fresh segment. A worker given up for lost may only be slow:
        it keeps the old segment mapped, and when its step ends it writes there, never into rows
        that now belong to its replacement. The other workers sharing memory attach to the new one;
        returns those lost meanwhile (to be restarted too)."""
        old = self.buffer
        new = BatchBuffer(old.space, old.action_space, old.num_envs, shared=True)
        new.copy_from(old)
        self.segments[0] = new
        old.close()
        survivors = [worker for worker in self.workers if worker.shared_memory and worker not in lost]
        for worker in survivors:
            worker.shared_memory = False  # until it says it attached: its results travel in its replies
        lost_now: list[WorkerHandle] = []
        replies = self.router.ask(
            m.ATTACH,
            {worker: {"obs": new.descriptor, "channel": None} for worker in survivors},
            DEFAULT_STARTUP_TIMEOUT,
            lost=lost_now,
        )
        for worker, reply in replies.items():
            worker.shared_memory = reply["kind"] == m.ATTACHED and reply["obs"]
        return lost_now

    def _restart(self, lost: WorkerHandle) -> tuple[WorkerHandle, dict[str, Any]]:
        """Builds a lost worker's envs again on a newly leased worker and resets them; returns it and the reset's reply."""
        now = time.monotonic()
        while self._restarts and self._restarts[0] < now - 60:
            self._restarts.popleft()
        if len(self._restarts) >= RESTARTS_PER_MINUTE:
            raise WorkerDiedError(
                f"envfarm {lost.describe()} {lost.dead}; not restarted: {RESTARTS_PER_MINUTE} restarts in the last minute already",
                lost,
            )
        self._restarts.append(now)
        try:
            [worker] = self._lease(len(lost.env_ids), DEFAULT_STARTUP_TIMEOUT, first_index=lost.env_ids.start, add=True)
        except (FarmError, multiprocessing.TimeoutError) as e:  # a lease that does not add up, no reply
            raise WorkerDiedError(f"envfarm {lost.describe()} {lost.dead}; restarting it failed: {e}", lost) from None
        except RuntimeError as e:  # the broker's answer: no free worker has the slots
            raise WorkerDiedError(
                f"envfarm {lost.describe()} {lost.dead}; no capacity left to restart it: {e}", lost
            ) from None
        worker.index = lost.index
        try:
            with self.router.patience(DEFAULT_STARTUP_TIMEOUT):
                self._await_hellos([worker], DEFAULT_STARTUP_TIMEOUT)
                for kind, fields in (
                    (m.CREATE, self._create_fields(worker)),
                    (m.ATTACH, {"obs": self.buffer.descriptor, "channel": None}),
                    (m.RESET, {"envs": list(worker.env_ids), "seeds": [None] * len(worker.env_ids), "options": None}),
                ):
                    reply = self.router.ask(kind, {worker: fields}, DEFAULT_STARTUP_TIMEOUT)[worker]
                    if kind == m.ATTACH:
                        worker.shared_memory = reply["kind"] == m.ATTACHED and reply["obs"]
                    else:
                        raise_env_errors([(worker, reply)])
        except Exception as e:
            raise WorkerDiedError(
                f"envfarm {lost.describe()} {lost.dead}; restarting it on {worker.describe()} failed: {type(e).__name__}: {e}",
                lost,
            ) from e
        self.workers[self.workers.index(lost)] = worker
        return worker, reply

    # ----------------------------------------------------------------- close

    def close(self, pending: tuple[int, list[WorkerHandle]] | None, timeout: float) -> None:
        """Awaits a pending request, closes every worker's envs, gives leased workers back to the
        farm and waits for local ones to exit, all within `timeout` seconds; `release` then frees
        what is left."""
        if pending is not None:
            self.router.gather(*pending, timeout)
        for _, reply in self.ask(m.CLOSE, {worker: {} for worker in self.workers}, timeout):
            for env_id, error in reply.get("errors", []):
                logger.warn(f"envfarm: env {env_id} raised in close(): {ErrorInfo.from_data(error).message}")
        if self.broker is not None:  # the workers are free for other trainers
            self.broker.release(timeout)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))


def in_order(replies: dict[WorkerHandle, dict[str, Any]]) -> Replies:
    """Replies sorted by worker, i.e. in env order."""
    return sorted(replies.items(), key=lambda item: item[0].index)


def _release(
    router: Router,
    broker: BrokerClient | None,
    workers: list[WorkerHandle],
    segments: list[BatchBuffer | TrainerChannels],
) -> None:
    """Frees everything a pool holds; runs once, from close(), garbage collection or exit."""
    for worker in workers:
        if worker.process is not None and worker.process.is_alive():
            worker.process.kill()
    for worker in workers:
        if worker.process is not None:
            worker.process.join()
        elif worker.inline:
            worker.route.close()
    if broker is not None:
        broker.close()
    router.close()
    for segment in segments:
        segment.close()
