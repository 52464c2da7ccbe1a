"""Workers that host Gymnasium envs behind ZeroMQ DEALER sockets."""

from envfarm.server.request_handler import RequestHandler
from envfarm.server.worker import Worker, run_local_worker

__all__ = ["RequestHandler", "Worker", "run_local_worker"]
