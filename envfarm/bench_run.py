"""A run of `envfarm bench`: what can run here, every measurement interleaved, and the report of their medians.

Measurements are interleaved (repeat, then env, then num_envs, then every backend in a rotated
order) so that a noisy machine's slow spells fall on all the backends alike; results are medians
over the repeats, and ratios compare medians of the same env and num_envs. One measurement:
envfarm/bench_measure.py (the `random` loop) and envfarm/bench_training.py (the loops with a torch
policy). The table, bench.csv, bench.json and the plot: envfarm/bench_report.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import gymnasium as gym

import envfarm
from envfarm import bench_measure, bench_training
from envfarm.bench_config import BACKENDS, INSTALL_HINT, BenchConfig, EnvCase, command_line, env_cases
from envfarm.bench_measure import Measurement
from envfarm.bench_report import write_outputs
from envfarm.bench_training import LOOPS, STEP_BACKENDS, check_loops

SUMMARY_FIELDS = (
    "steps_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "startup_s",
    "worker_mib",
    "trainer_mib",
    "cpu_us_per_step",
)


# ---------------------------------------------------------------------------------- availability


def _missing_module(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            return name
        if name == "ale_py":
            gym.register_envs(module)  # ALE ids exist only once ale_py has registered them
    return None


def plan_cases(config: BenchConfig, log: TextIO) -> tuple[list[tuple[EnvCase, list[str]]], list[str]]:
    """The envs that can run, each with the backends that can run it, and a message per skipped row group."""
    known = env_cases(config)
    skipped: list[str] = []

    def skip(message: str) -> None:
        skipped.append(message)
        print(f"envfarm bench: skipping {message}", file=log)

    for names, valid, what in (
        (config.envs, known, "env"),
        (config.backends, BACKENDS, "backend"),
        (config.loops, LOOPS, "loop"),
    ):
        for name in names:
            if name not in valid:
                raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(valid)}")
    backends = list(config.backends)
    if "envpool" in backends and _missing_module(("envpool",)):
        skip(f"envpool: envpool is not installed ({INSTALL_HINT})")
        backends.remove("envpool")
    if "envfarm-async" in backends and not hasattr(envfarm.FarmVectorEnv, "recv"):
        skip("envfarm-async: this envfarm has no async API (FarmVectorEnv.recv)")
        backends.remove("envfarm-async")
    missing_torch = check_loops(config.loops)
    if missing_torch:
        skip(f"the training loops: {missing_torch}")
        config.loops = tuple(loop for loop in config.loops if loop == "random")

    plan = []
    for key in config.envs:
        case = known[key]
        missing = _missing_module(case.requires)
        if missing:
            skip(f"{case.env_id}: {missing} is not installed ({INSTALL_HINT})")
            continue
        runnable = list(backends)
        if "envpool" in runnable and case.envpool_id is None:
            skip(f"envpool on {case.env_id}: EnvPool has no such env")
            runnable.remove("envpool")
        plan.append((case, runnable))
    return plan, skipped


# ---------------------------------------------------------------------------------- the run


def _rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def run_bench(config: BenchConfig, out_dir: str | Path | None = None, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Runs the bench, prints progress to `log`, and writes bench.csv/json/png to `out_dir` if given.

    Returns the report written to bench.json: "meta", "results" (one row per backend, env and
    num_envs, medians over repeats), "measurements", "skipped" and "errors".
    """
    meta = _meta(config)  # the commit and date at the start: the code measured, whatever lands meanwhile
    plan, skipped = plan_cases(config, log)
    cells = []
    for loop in config.loops:
        for case, backends in plan:
            if loop != "random":  # a policy steps with step(): the send/recv backend has no place in its loop
                backends = [backend for backend in backends if backend in STEP_BACKENDS]
            cells += [(loop, case, n, backends) for n in config.num_envs]
    total = config.repeats * sum(len(backends) for *_, backends in cells)
    measurements: list[Measurement] = []
    errors: list[str] = []
    count = 0
    for repeat in range(config.repeats):
        for index, (loop, case, n, backends) in enumerate(cells):
            for backend in _rotated(backends, repeat + index):
                count += 1
                label = f"[{count}/{total}] {backend} {case.env_id} n={n} {loop} repeat {repeat + 1}"
                try:
                    if loop == "random":
                        result = bench_measure.measure(backend, case, n, repeat, config)
                    else:
                        result = bench_training.measure(backend, case, n, repeat, config, loop)
                except Exception as e:  # one broken backend must not cost the whole run
                    errors.append(f"{label}: {type(e).__name__}: {e}")
                    print(f"{label}: failed: {type(e).__name__}: {e}", file=log, flush=True)
                    continue
                measurements.append(result)
                print(f"{label}: {result.steps_per_s:,.0f} steps/s", file=log, flush=True)

    report = {
        "meta": meta,
        "results": summarize(measurements),
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "skipped": skipped,
        "errors": errors,
    }
    if out_dir is not None:
        write_outputs(report, Path(out_dir), log)
    return report


def summarize(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """One row per (loop, env, num_envs, backend) in first-measured order: medians over repeats, and
    the ratio of its median steps/s to sync's, async's and ideal's for the same loop, env and num_envs."""
    groups: dict[tuple[str, str, int, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.loop, m.env_id, m.num_envs, m.backend), []).append(m)
    rows = []
    for (loop, env_id, num_envs, backend), group in groups.items():
        row: dict[str, Any] = {
            "loop": loop,
            "env_id": env_id,
            "num_envs": num_envs,
            "backend": backend,
            "repeats": len(group),
        }
        for field in SUMMARY_FIELDS:
            values = [getattr(m, field) for m in group if getattr(m, field) is not None]
            row[field] = statistics.median(values) if values else None
        rows.append(row)
    speed = {(r["loop"], r["env_id"], r["num_envs"], r["backend"]): r["steps_per_s"] for r in rows}
    for row in rows:
        for anchor in ("sync", "async", "ideal"):
            base = speed.get((row["loop"], row["env_id"], row["num_envs"], anchor))
            row[f"vs_{anchor}"] = row["steps_per_s"] / base if base else None
    cells = list(dict.fromkeys((r["loop"], r["env_id"], r["num_envs"]) for r in rows))
    rows.sort(key=lambda r: (cells.index((r["loop"], r["env_id"], r["num_envs"])), BACKENDS.index(r["backend"])))
    return rows


def _meta(config: BenchConfig) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": command_line(config),
        "commit": commit,
        "envfarm": envfarm.__version__,
        "gymnasium": gym.__version__,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": dataclasses.asdict(config),
    }
