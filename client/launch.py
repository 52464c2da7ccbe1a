"""Starting worker processes on this host for a trainer's local farm."""

from __future__ import annotations

import multiprocessing
import os
import secrets

from gymnasium.vector.utils import clear_mpi_env_vars

from envfarm.client.worker_handle import WorkerHandle
from envfarm.server import run_local_worker


def partition(num_envs: int, num_workers: int) -> list[range]:
    """Contiguous blocks of env indices, as even as possible, one per worker."""
    base, extra = divmod(num_envs, num_workers)
    blocks, start = [], 0
    for i in range(num_workers):
        stop = start + base + (i < extra)
        blocks.append(range(start, stop))
        start = stop
    return blocks


def start_local_workers(endpoint: str, blocks: list[range], context: str | None, daemon: bool) -> list[WorkerHandle]:
    """Starts one worker process per block; each connects back to `endpoint` with a secret identity.

    The identity is the worker's only credential on the trainer's socket: the trainer ignores
    every peer whose identity it did not hand out itself.
    """
    ctx = multiprocessing.get_context(context)
    is_parent = ctx.get_start_method() != "forkserver"  # the fork server is a forkserver worker's parent
    workers = []
    with clear_mpi_env_vars():
        for index, block in enumerate(blocks):
            identity = secrets.token_bytes(16)
            process = ctx.Process(
                target=run_local_worker,
                args=(endpoint, identity, os.getpid(), is_parent),
                name=f"envfarm-worker-{index}",
                daemon=daemon,
            )
            process.start()
            workers.append(WorkerHandle(index, identity, block, process=process, pid=process.pid))
    return workers
