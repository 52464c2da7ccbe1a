"""SharedState: what FarmVectorEnv's two APIs, reset/step/call and send/recv, both read and write.

The vector env holds one and gives it to its send/recv half (client/send_recv.py), so that each of
these facts has exactly one owner and neither API reaches into the other's members. It is not the
WorkerPool's: the pool speaks the protocol, and these are Gymnasium's terms (an env ended) or the
vector env's own (it can only be closed now).
"""

from __future__ import annotations

import numpy as np

from envfarm.client.errors import FarmError


class SharedState:
    def __init__(self, num_envs: int):
        # Which envs terminated or truncated in the result they last returned (a reset clears it):
        # with autoreset_mode DISABLED neither API steps them until they are reset. Not read off the
        # batch buffer's terminations: a shared-memory worker writes those in place, also for a step
        # whose reply was dropped after a timeout.
        self.ended = np.zeros(num_envs, np.bool_)
        # The FarmError (a lost worker, a broken socket) raised by the pool or the router that
        # leaves the envs in an unknown state: from then on every call raises it again, and only
        # close() is left (which then skips the graceful shutdown).
        self.failure: FarmError | None = None
