"""`Farm`: where a FarmVectorEnv leases its workers when they come from a farm broker.

    envs = envfarm.make_vec("CartPole-v1", 16, broker="tcp://head:5555")   # builds the Farm
    envs = envfarm.FarmVectorEnv(env_fns, farm=envfarm.Farm("tcp://head:5555", "CartPole-v1"))

Its options are kept apart from FarmVectorEnv's own arguments, which are AsyncVectorEnv's: those
say how to run envs, these where the farm is and how to reach it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ON_FAILURE = ("raise", "restart")


@dataclass(frozen=True)
class Farm:
    """A farm broker to lease workers from, instead of starting local worker processes.

    Attributes:
        broker: The broker's endpoint, e.g. "tcp://head:5555".
        env_id: The registered env id the farm workers build (they take no code, so no env_fns).
        env_kwargs: Keyword arguments for each env's constructor (`gymnasium.make(env_id, **env_kwargs)`).
        listen: "host" or "host:port" where the leased farm workers reach this trainer (they
            connect to it directly; the broker only introduces them). Default: this host's
            address on its route to the broker, and a free port.
        curve: (this trainer's secret key file, the broker's public key file): CurveZMQ to the
            broker and to the leased workers (see transport/curve.py).
        on_failure: "raise" (default): a lost worker raises WorkerDiedError. "restart": its envs
            are built again on another leased worker and reset; that step or reset reports them
            truncated=True with info["envfarm_restarted"] (their last observation is gone: the
            one returned begins the new episode; under SAME_STEP it is also their
            info["final_obs"], with an empty final_info; under NEXT_STEP their next step is the
            autoreset step, as after any end: a reset, reward 0). The send/recv API does not
            restart: there a lost worker raises WorkerDiedError. At most 5 restarts a minute
            (RESTARTS_PER_MINUTE, client/worker_pool.py), then WorkerDiedError.

    Raises:
        ValueError: For an `on_failure` other than "raise" or "restart".
    """

    broker: str
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    listen: str | None = None
    curve: tuple[str, str] | None = None
    on_failure: str = "raise"

    def __post_init__(self) -> None:
        check_on_failure(self.on_failure, self.broker)

    def pool_options(self) -> dict[str, Any]:
        """WorkerPool's keyword arguments for this farm."""
        return {
            "broker": self.broker,
            "remote_env": {"env_id": self.env_id, "kwargs": self.env_kwargs},
            "listen": self.listen,
            "curve": self.curve,
            "on_failure": self.on_failure,
        }


def check_on_failure(on_failure: str, broker: str | None) -> None:
    """Refuses an unknown `on_failure`, and "restart" without a farm broker: restarts lease a new
    worker, which only a farm has, and a local worker's death is a bug to see, not to hide."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be 'raise' or 'restart', got {on_failure!r}")
    if on_failure == "restart" and broker is None:
        raise ValueError(
            "on_failure='restart' needs a farm (broker=...): a local worker's death is a bug to see, not to hide"
        )
