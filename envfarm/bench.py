"""`envfarm bench`: envfarm against SyncVectorEnv, AsyncVectorEnv and EnvPool, interleaved in one run.

This module is the command line: its options, its presets (the full run, `--quick` and
`--training`) and `main`, which prints the table. The bench itself, read in this order:

- envfarm/bench_config.py: the backends, the envs, a run's settings (BenchConfig);
- envfarm/bench_run.py: what can run here, the interleaved measurements, their medians (run_bench);
- envfarm/bench_measure.py: one measurement with random actions, in this process;
- envfarm/bench_training.py: one measurement with a torch policy, in a process of its own;
- envfarm/bench_ideal.py: the `ideal` row, the limit of two processes in Python;
- envfarm/bench_envs.py: the synthetic envs;
- envfarm/bench_report.py: the table, bench.csv, bench.json and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from envfarm.bench_config import BACKENDS, BenchConfig
from envfarm.bench_report import format_table
from envfarm.bench_run import run_bench
from envfarm.bench_training import LOOPS

# `--training`: what a training run sees, read against the ideal harness.
TRAINING = BenchConfig(
    envs=("cartpole", "halfcheetah"),
    num_envs=(8, 16),
    backends=("sync", "envfarm", "envfarm-inline", "ideal"),
    loops=("mlp", "mlp-1t", "ppo", "ppo-1t"),
)


# The CI smoke: every backend's code path on two cheap envs, in seconds.
QUICK = BenchConfig(
    envs=("cartpole", "synthetic"),
    num_envs=(4,),
    repeats=1,
    steps=400,
    seconds=2.0,
    synthetic_step_us=100.0,
    synthetic_obs=(16, 16, 3),
)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _names(text))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `envfarm bench` options; unset ones take the defaults of the full or the --quick config.

    envfarm/bench_config.py's command_line writes a config back as these options.
    """
    parser.add_argument("--envs", type=_names, help="comma-separated: cartpole,halfcheetah,pong,synthetic,tail")
    parser.add_argument("--num-envs", type=_ints, help="comma-separated, default 8,16,32,64")
    parser.add_argument("--backends", type=_names, help=f"comma-separated, default {','.join(BACKENDS)}")
    parser.add_argument("--repeats", type=int, help="interleaved rounds over everything (default 3)")
    parser.add_argument("--steps", type=int, help="env steps timed per measurement (default 20000)...")
    parser.add_argument("--seconds", type=float, help="...or at most this long (default 2)")
    parser.add_argument("--synthetic-step-us", type=float, help="CPU microseconds per synthetic step (default 1000)")
    parser.add_argument("--synthetic-obs", type=_shape, help="synthetic uint8 observation shape (default 84x84x3)")
    parser.add_argument(
        "--loops",
        type=_names,
        help=f"comma-separated: {','.join(LOOPS)} (default random; see envfarm/bench_training.py)",
    )
    parser.add_argument(
        "--training",
        action="store_true",
        help="the training loops with a torch policy: CartPole and HalfCheetah x8 and x16, sync, envfarm, inline and ideal",
    )
    parser.add_argument("--out", default="bench-results", help="directory for bench.csv, bench.json, bench.png")
    parser.add_argument("--quick", action="store_true", help="a tiny config for a smoke test (CI)")


def main(args: argparse.Namespace) -> int:
    """Runs `envfarm bench` from parsed arguments; prints the table to stdout."""
    if args.quick and args.training:
        print("envfarm bench: --quick and --training are two presets; pick one", file=sys.stderr)
        return 2
    config = dataclasses.replace(QUICK if args.quick else TRAINING if args.training else BenchConfig())
    fields = (
        "envs",
        "num_envs",
        "backends",
        "repeats",
        "steps",
        "seconds",
        "synthetic_step_us",
        "synthetic_obs",
        "loops",
    )
    for field in fields:
        if getattr(args, field) is not None:
            setattr(config, field, getattr(args, field))
    if config.repeats < 1 or config.steps < 1 or not config.num_envs or min(config.num_envs) < 1:
        print("envfarm bench: --repeats, --steps and --num-envs must be at least 1", file=sys.stderr)
        return 2
    try:
        report = run_bench(config, args.out)
    except ValueError as e:
        print(f"envfarm bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nenvfarm bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(report["results"]))
    return 1 if report["errors"] else 0
