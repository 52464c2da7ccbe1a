"""envfarm: Gymnasium vector environments served by worker processes over ZeroMQ.

    import envfarm
    envs = envfarm.make_vec("CartPole-v1", num_envs=16)   # a drop-in for gymnasium's AsyncVectorEnv
"""

from envfarm.client import FarmError, FarmVectorEnv, RemoteEnvError, WorkerDiedError, make_vec
from envfarm.protocol import PROTOCOL_VERSION, ProtocolError

__version__ = "0.1.0"
__all__ = [
    "FarmError",
    "FarmVectorEnv",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "RemoteEnvError",
    "WorkerDiedError",
    "make_vec",
]
