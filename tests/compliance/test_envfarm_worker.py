"""envfarm's own worker passes the compliance suite (tests/compliance/worker.py)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import pytest
import zmq
from compliance.worker import Peer, WorkerCompliance

from envfarm.server import run_local_worker


class TestEnvfarmWorker(WorkerCompliance):
    @pytest.fixture
    def peer(self) -> Iterator[Peer]:
        context = zmq.Context()
        peer = Peer.bind(context)
        process = multiprocessing.get_context("spawn").Process(
            target=run_local_worker, args=(peer.endpoint, peer.identity, os.getpid()), daemon=True
        )
        process.start()
        try:
            yield peer
        finally:
            process.kill()
            process.join(10)
            context.destroy(linger=0)
