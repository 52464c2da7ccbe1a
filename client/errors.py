"""What the trainer raises when a worker fails, and how a remote env exception is rebuilt and raised here."""

from __future__ import annotations

import builtins
from typing import Any

import gymnasium.error

from envfarm.protocol import messages as m
from envfarm.protocol.errors import ErrorInfo


class FarmError(RuntimeError):
    """Base class of envfarm's own runtime failures."""


class WorkerDiedError(FarmError):
    """A worker process or host is gone; the envs it hosted are lost."""

    def __init__(self, message: str, worker: object = None):
        super().__init__(message)
        self.worker = worker  # the router's handle of the lost worker


class RemoteEnvError(FarmError):
    """An env raised an exception whose class cannot be rebuilt in the trainer."""


def rebuild(info: ErrorInfo, where: str) -> BaseException:
    """The exception an env raised, as the same class when it is a builtin or Gymnasium error.

    The remote traceback and the env that raised it are added as notes, so the one-line message
    stays the env's own, as with Gymnasium's AsyncVectorEnv.
    """
    module, _, name = info.type.rpartition(".")
    home = {"": builtins, "gymnasium.error": gymnasium.error}.get(module)
    cls = getattr(home, name, None) if home is not None else None
    exc: BaseException | None = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(info.message)
        except Exception:  # a class whose constructor wants more than a message
            exc = None
    if exc is None:
        exc = RemoteEnvError(f"{info.type}: {info.message}")
    exc.add_note(f"raised by {where}; remote traceback:\n{info.traceback.rstrip()}")
    return exc


def raise_env_errors(replies: list[tuple[Any, dict[str, Any]]]) -> None:
    """Raises the first env's exception (by env index), naming every env that failed."""
    failures = []
    for worker, reply in replies:
        if reply["kind"] == m.ERROR:
            failures.append(
                (worker.env_ids.start, list(worker.env_ids), ErrorInfo.from_data(reply["error"]), worker.describe())
            )
        for env_id, error in reply.get("errors", []):
            failures.append((env_id, [env_id], ErrorInfo.from_data(error), f"env {env_id} on {worker.describe()}"))
    if not failures:
        return
    failures.sort(key=lambda failure: failure[0])
    _, _, info, where = failures[0]
    exc = rebuild(info, where)
    if len(failures) > 1:
        exc.add_note("also failed: " + "; ".join(f"{w}: {i.type}: {i.message}" for _, _, i, w in failures[1:]))
    exc.failed_envs = sorted({env for _, envs, _, _ in failures for env in envs})
    raise exc
