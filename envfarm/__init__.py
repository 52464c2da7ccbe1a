"""envfarm: Gymnasium vector environments served by worker processes over ZeroMQ.

    import envfarm
    envs = envfarm.make_vec("CartPole-v1", num_envs=16)   # a drop-in for gymnasium's AsyncVectorEnv

The names below are loaded on first use (PEP 562): a worker, a broker or a health check that
imports one envfarm module does not load the trainer's side with it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_HOMES = {
    "Farm": "envfarm.client",
    "FarmError": "envfarm.client",
    "FarmVectorEnv": "envfarm.client",
    "RemoteEnvError": "envfarm.client",
    "WorkerDiedError": "envfarm.client",
    "make_vec": "envfarm.client",
    "PROTOCOL_VERSION": "envfarm.protocol",
    "ProtocolError": "envfarm.protocol",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'envfarm' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
