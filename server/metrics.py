"""The broker's Prometheus metrics: `envfarm broker --metrics HOST:PORT` serves them at /metrics.

Read from the broker's own state when scraped (nothing is kept twice), in a registry of the
broker's own, so several brokers in one process (the tests) never share a metric:

    envfarm_workers                  registered workers (heard from within dead-after)
    envfarm_workers_leased           of them, leased to a trainer
    envfarm_slots                    envs the registered workers host at most
    envfarm_slots_free               of them, on unleased workers
    envfarm_trainers                 trainers holding a lease
    envfarm_env_steps_per_second     env steps per second, summed over the workers' last heartbeats
    envfarm_env_steps_total          env steps the workers served, as their heartbeats report them
    envfarm_leases_total             leases granted (a trainer's first lease, or a new one)
    envfarm_restarts_total           replacement workers leased for a lost worker's envs
    envfarm_workers_lost_total       workers struck off after dead-after of silence
    envfarm_trainers_lost_total      trainers whose lease ended after dead-after of silence
    envfarm_refused_total            trainers' requests refused (malformed, not allowed, no capacity)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from envfarm.server.broker import Broker

# The counters the broker keeps in `Broker.counts`, with their help texts.
COUNTERS = {
    "env_steps": "Env steps the workers served, as their heartbeats report them",
    "leases": "Leases granted",
    "restarts": "Replacement workers leased for a lost worker's envs",
    "workers_lost": "Workers struck off after dead-after of silence",
    "trainers_lost": "Trainers whose lease ended after dead-after of silence",
    "refused": "Trainers' requests refused",
}


class BrokerCollector(Collector):
    """Reports a broker's state at each scrape (from the HTTP server's thread: each read takes a
    snapshot of a dict in one call, which the GIL makes atomic against the broker's thread)."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        workers = list(self.broker.workers.values())
        counts = dict(self.broker.counts)
        gauges: list[tuple[str, str, Any]] = [
            ("workers", "Registered workers", len(workers)),
            ("workers_leased", "Registered workers leased to a trainer", sum(w.lessee is not None for w in workers)),
            ("slots", "Envs the registered workers host at most", sum(w.slots for w in workers)),
            ("slots_free", "Envs the unleased workers host at most", sum(w.slots for w in workers if w.lessee is None)),
            ("trainers", "Trainers holding a lease", len(self.broker.trainers)),
            (
                "env_steps_per_second",
                "Env steps per second over the workers' last heartbeats",
                sum(w.steps_per_s for w in workers),
            ),
        ]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(f"envfarm_{name}", help_text, value=value)
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"envfarm_{name}", help_text, value=counts.get(name, 0))


def serve_metrics(broker: Broker, address: str) -> tuple[Any, int]:
    """Serves the broker's metrics over HTTP at `address` ("host:port"; port 0: any free one).
    Returns the server (`.shutdown()` stops it) and its port."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BrokerCollector(broker))
    server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server, server.server_port
