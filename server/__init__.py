"""Workers that host Gymnasium envs behind ZeroMQ DEALER sockets."""

from envfarm.server.worker import Worker, run_local_worker

__all__ = ["Worker", "run_local_worker"]
