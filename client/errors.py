"""What the trainer raises when a worker fails, and how a remote env exception is rebuilt here."""

from __future__ import annotations

import builtins

import gymnasium.error

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
