"""The trainer's side: FarmVectorEnv, local worker launch, the embedded broker and shared memory."""

from envfarm.client.errors import FarmError, RemoteEnvError, WorkerDiedError
from envfarm.client.farm import Farm
from envfarm.client.make import make_vec
from envfarm.client.vector_env import FarmVectorEnv

__all__ = ["Farm", "FarmError", "FarmVectorEnv", "RemoteEnvError", "WorkerDiedError", "make_vec"]
