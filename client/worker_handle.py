"""WorkerHandle: one worker as the trainer sees it (local, inline, or leased from a farm)."""

from __future__ import annotations

import functools
import signal
from dataclasses import dataclass
from typing import Any

from envfarm.client.routes import InlineRoute, Route


@dataclass(eq=False)
class WorkerHandle:
    """One worker as the trainer sees it: its routing id, the envs it owns, its process if local."""

    index: int
    identity: bytes
    env_ids: range
    process: Any = None  # multiprocessing.Process for a local worker
    pid: int | None = None
    host: str = ""
    route: Route | None = None  # how requests reach it (client/routes.py): given by the router, or inline
    shared_memory: bool = False  # reads actions from and writes results into the trainer's batch buffer
    dead: str = ""  # why, once it is known to be gone
    # A farm worker's liveness (client/liveness.py):
    last_heard: float = 0.0  # when its last message or heartbeat arrived
    connected: bool = False  # it said HELLO on this trainer's socket
    connection: int | None = None  # the token of the data connection it said HELLO on
    lost_request: bool = False  # its heartbeat proved a request lost; the verdict is being given

    @functools.cached_property
    def env_list(self) -> list[int]:
        """env_ids as the list a message carries, made once (a step's hot path compares it); never mutate it."""
        return list(self.env_ids)

    @property
    def inline(self) -> bool:
        """Its envs are served in the trainer's own process (inline_worker=True)."""
        return isinstance(self.route, InlineRoute)

    @property
    def remote(self) -> bool:
        """A farm worker: not started by this trainer, so known alive only by what it sends."""
        return self.process is None and not self.inline

    def describe(self) -> str:
        envs = f"env {self.env_ids[0]}" if len(self.env_ids) == 1 else f"envs {self.env_ids[0]}-{self.env_ids[-1]}"
        if self.inline:
            return f"worker {self.index} (in the trainer, {envs})"
        pid = f", pid {self.pid}" if self.pid else ""
        return f"worker {self.index} ({self.host or 'local'}{pid}, {envs})"


def exit_reason(process: Any) -> str:
    """Why a local worker process is gone, in words."""
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
