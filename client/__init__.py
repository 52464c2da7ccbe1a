"""The trainer's side: FarmVectorEnv and make_vec, over workers started here or leased from a farm (a Farm)."""

from envfarm.client.errors import FarmError, RemoteEnvError, WorkerDiedError
from envfarm.client.farm import Farm
from envfarm.client.make import make_vec
from envfarm.client.vector_env import FarmVectorEnv

__all__ = ["Farm", "FarmError", "FarmVectorEnv", "RemoteEnvError", "WorkerDiedError", "make_vec"]
