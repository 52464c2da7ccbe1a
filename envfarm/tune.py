"""`envfarm tune ENV_ID --num-envs N`: which arrangement of processes steps these envs fastest here.

In the spirit of PufferLib's autotune: it measures, interleaved and repeated, SyncVectorEnv (the
anchor) and the arrangements envfarm offers on this machine's CPUs, with a pause per step that
stands for the policy (`--policy-us`), and prints each one's steps/s, its ratio to
SyncVectorEnv, the CPU time per env step of all its processes, and the `make_vec` arguments of
the fastest:

- the default: one worker process per CPU, the trainer waiting;
- `inline_worker=True`: the trainer steps one block of envs itself while one worker per other CPU
  steps theirs (the trainer counted as a process);
- one worker per CPU but one, leaving the trainer a CPU of its own.

It changes no default: with `inline_worker=True`, `step_async` steps the trainer's block before it
returns and a `step_wait` timeout cannot interrupt an env of that block (as AsyncVectorEnv's
semantics promise), and a crash there is the trainer's. Choosing that trade is the user's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any, TextIO

import gymnasium as gym

import envfarm
from envfarm.bench_measure import cpu_seconds
from envfarm.transport.cpus import available_cpus


def arrangements(num_envs: int, cpus: int) -> dict[str, dict[str, Any] | None]:
    """The candidates, by name: make_vec arguments (None: SyncVectorEnv, the anchor)."""
    candidates: dict[str, dict[str, Any] | None] = {"sync": None, "default": {}}
    if cpus >= 2 and num_envs >= 2:
        candidates["inline"] = {"inline_worker": True, "num_workers": min(cpus, num_envs)}
        candidates["a CPU for the trainer"] = {"num_workers": min(cpus - 1, num_envs)}
    return candidates


def measure(
    env_id: str, num_envs: int, options: dict[str, Any] | None, policy_us: float, seconds: float
) -> tuple[float, float]:
    """(env steps per second, CPU microseconds per env step of all the processes)."""
    if options is None:
        envs = gym.make_vec(env_id, num_envs, vectorization_mode="sync")
    else:
        envs = envfarm.make_vec(env_id, num_envs, **options)
    try:
        envs.reset(seed=0)
        actions = [envs.action_space.sample() for _ in range(64)]
        for i in range(20):
            envs.step(actions[i % 64])
        pids = [process.pid for process in getattr(envs, "processes", [])]
        cpu, start, steps = cpu_seconds(pids), time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            pause_until = time.perf_counter() + policy_us / 1e6
            while time.perf_counter() < pause_until:  # the policy's time: busy, as inference is
                pass
            envs.step(actions[steps % 64])
            steps += 1
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    finally:
        envs.close()
    return steps * num_envs / elapsed, cpu * 1e6 / (steps * num_envs)


def tune(
    env_id: str,
    num_envs: int,
    policy_us: float = 0.0,
    seconds: float = 2.0,
    repeats: int = 3,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Measures every arrangement; prints the table and returns the fastest's make_vec arguments."""
    out = out or sys.stdout
    cpus = available_cpus()
    candidates = arrangements(num_envs, cpus)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for repeat in range(repeats):
        names = list(candidates)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]  # a slow spell falls on all alike
        for name in names:
            results[name].append(measure(env_id, num_envs, candidates[name], policy_us, seconds))
    anchor = statistics.median(sps for sps, _ in results["sync"])
    print(
        f"{env_id} x{num_envs}, {cpus} CPUs, policy {policy_us:g} us per step; medians of {repeats} interleaved runs of {seconds:g} s",
        file=out,
    )
    print(f"{'arrangement':<24}{'steps/s':>10}{'vs sync':>9}{'CPU us/step':>13}  make_vec arguments", file=out)
    for name, values in results.items():
        sps, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        arguments = (
            "(SyncVectorEnv)" if candidates[name] is None else _arguments(candidates[name]) or "(none: the defaults)"
        )
        print(f"{name:<24}{sps:>10.0f}{sps / anchor:>8.2f}x{cpu:>13.0f}  {arguments}", file=out)
    farm = [name for name in candidates if candidates[name] is not None]
    best = max(farm, key=lambda name: statistics.median(v[0] for v in results[name]))
    print(
        f"fastest envfarm arrangement: envfarm.make_vec({env_id!r}, {num_envs}{', ' if candidates[best] else ''}{_arguments(candidates[best])})",
        file=out,
    )
    if best == "inline":
        print("  (inline_worker=True: that block steps in the trainer's process; see `envfarm tune --help`)", file=out)
    return dict(candidates[best] or {})


def _arguments(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("env_id")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument(
        "--policy-us",
        type=float,
        default=0.0,
        help="microseconds of busy CPU per step standing for the policy (default 0)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3)


def main(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", module="gymnasium")
    tune(args.env_id, args.num_envs, args.policy_us, args.seconds, args.repeats)
    return 0
