"""`envfarm bench`: envfarm against SyncVectorEnv, AsyncVectorEnv and EnvPool, interleaved in one run.

Every measurement builds a vector env, resets it, warms it up, times steps with pre-sampled
random actions (the `random` loop; envfarm/bench_training.py has the loops with a torch policy,
`--training`), and closes it. Measurements are interleaved (repeat, then env, then num_envs,
then every backend in a rotated order) so that a noisy machine's slow spells fall on all the
backends alike; results are medians over the repeats, and ratios compare medians of the same
env and num_envs.

The table, bench.csv, bench.json and the plot: envfarm/bench_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

import envfarm
from envfarm import bench_training
from envfarm.bench_envs import HEAVY_TAIL_ID, SYNTHETIC_ID
from envfarm.bench_ideal import IdealPair
from envfarm.bench_report import format_table, write_outputs
from envfarm.bench_training import LOOPS, STEP_BACKENDS, check_loops

BACKENDS = ("sync", "async", "envpool", "envfarm", "envfarm-wire", "envfarm-inline", "envfarm-async", "ideal")
INSTALL_HINT = "pip install 'envfarm[bench]'"
ACTION_POOL = 64  # distinct pre-sampled batched actions, cycled through while timing
TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class EnvCase:
    """One env of the bench, as Gymnasium and (where it has it) EnvPool name it."""

    key: str
    env_id: str
    kwargs: dict[str, Any]
    requires: tuple[str, ...] = ()
    envpool_id: str | None = None
    envpool_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BenchConfig:
    envs: tuple[str, ...] = ("cartpole", "halfcheetah", "pong", "synthetic", "tail")
    num_envs: tuple[int, ...] = (8, 16, 32, 64)
    backends: tuple[str, ...] = BACKENDS
    repeats: int = 3
    steps: int = 20_000  # env steps timed per measurement, at most...
    seconds: float = 2.0  # ...and for at most this long, so slow envs do not dominate the run
    warmup: int = 5  # untimed steps (calls) after reset
    synthetic_step_us: float = 1000.0
    synthetic_obs: tuple[int, ...] = (84, 84, 3)
    seed: int = 0
    loops: tuple[str, ...] = ("random",)  # who picks the actions: see envfarm/bench_training.py


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


def env_cases(config: BenchConfig) -> dict[str, EnvCase]:
    """The bench's envs by key; EnvPool's Pong is set up to match Gymnasium's ALE/Pong-v5 (RGB, no stacking)."""
    synthetic = {"step_cost_us": config.synthetic_step_us, "obs_shape": config.synthetic_obs}
    pong_like_ale = {
        "img_height": 210,
        "img_width": 160,
        "gray_scale": False,
        "stack_num": 1,
        "noop_max": 1,
        "use_fire_reset": False,
        "repeat_action_probability": 0.25,
    }
    cases = [
        EnvCase("cartpole", "CartPole-v1", {}, envpool_id="CartPole-v1"),
        EnvCase("halfcheetah", "HalfCheetah-v5", {}, ("mujoco",), "HalfCheetah-v5"),
        EnvCase("pong", "ALE/Pong-v5", {}, ("ale_py",), "Pong-v5", pong_like_ale),
        EnvCase("synthetic", SYNTHETIC_ID, synthetic),
        EnvCase("tail", HEAVY_TAIL_ID, {}),
    ]
    return {case.key: case for case in cases}


@dataclasses.dataclass
class Measurement:
    backend: str
    env_id: str
    num_envs: int
    repeat: int
    env_steps: int
    seconds: float
    steps_per_s: float
    p50_us: float  # latency of one step call (a batch of B envs for envfarm-async)
    p90_us: float
    p99_us: float
    startup_s: float  # construction and first reset
    worker_mib: float | None  # summed PSS of the worker processes; None where envs run in-process
    trainer_mib: float  # RSS of this process (it grows over a run: modules loaded, memory not returned)
    cpu_us_per_step: float | None = None  # CPU time of the trainer and its workers per env step
    loop: str = "random"


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


# ---------------------------------------------------------------------------------- measuring


def _start(backend: str, case: EnvCase, num_envs: int, seed: int) -> tuple[Any, Callable[[int], Any], int]:
    """Builds and resets a vector env; returns it, a step function taking the index of a pre-sampled
    action, and the env steps each call makes."""
    if backend == "envfarm-async":
        batch = max(1, num_envs // 2)
        envs = envfarm.make_vec(case.env_id, num_envs, env_kwargs=case.kwargs, batch_size=batch)
        return envs, _async_stepper(envs, batch, seed), batch
    if backend in ("sync", "async"):
        vector_kwargs = {"shared_memory": True} if backend == "async" else {}
        envs = gym.make_vec(
            case.env_id, num_envs, vectorization_mode=backend, vector_kwargs=vector_kwargs, **case.kwargs
        )
        envs.reset(seed=seed)
    elif backend == "ideal":  # the limit of two processes in Python: see envfarm/bench_ideal.py
        envs = IdealPair(case.env_id, num_envs, case.kwargs, seed)
    elif backend == "envpool":
        import envpool

        envs = envpool.make_gymnasium(case.envpool_id, num_envs=num_envs, seed=seed, **case.envpool_kwargs)
        envs.reset()  # EnvPool takes its seed at construction
    else:
        options = {"envfarm": {}, "envfarm-wire": {"shared_memory": False}, "envfarm-inline": {"inline_worker": True}}[
            backend
        ]
        envs = envfarm.make_vec(case.env_id, num_envs, env_kwargs=case.kwargs, **options)
        envs.reset(seed=seed)
    actions = _action_pool(envs.single_action_space, num_envs, seed)
    return envs, lambda i: envs.step(actions[i % ACTION_POOL]), num_envs


def _async_stepper(envs: Any, batch: int, seed: int) -> Callable[[int], Any]:
    """Steps whichever `batch` envs finished first: send their actions, receive the next batch."""
    actions = _action_pool(envs.single_action_space, batch, seed)
    envs.async_reset(seed=seed)
    ready = [envs.recv(timeout=None)[4]["env_id"]]

    def step(i: int) -> None:
        envs.send(actions[i % ACTION_POOL], ready[0])
        ready[0] = envs.recv(timeout=None)[4]["env_id"]

    return step


def _action_pool(single_space: gym.Space, num_envs: int, seed: int) -> list[Any]:
    # Sampled before timing, so that Gymnasium's sampling cost is in no backend's numbers.
    space = batch_space(single_space, num_envs)
    space.seed(seed)
    return [space.sample() for _ in range(ACTION_POOL)]


def _proc_mib(pid: int, path: str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process (every thread) and of the processes `pids`, in seconds."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        except OSError:
            pass
    return total


def _workers_mib(pids: list[int]) -> float:
    # PSS, not RSS: forked workers share the trainer's pages, and summing RSS would count them once
    # per worker (64 AsyncVectorEnv workers against envfarm's 2 would look far worse than they are).
    return sum(_proc_mib(pid, "smaps_rollup", "Pss:") for pid in pids)


def measure(backend: str, case: EnvCase, num_envs: int, repeat: int, config: BenchConfig) -> Measurement:
    """One measurement: startup, warm-up, then timed steps, closing the vector env in any case."""
    begin = time.perf_counter()
    envs, step, per_call = _start(backend, case, num_envs, config.seed + repeat)
    startup = time.perf_counter() - begin
    try:
        for i in range(config.warmup):
            step(i)
        calls = max(1, math.ceil(config.steps / per_call))
        latencies = np.empty(calls)
        pids = [p.pid for p in getattr(envs, "processes", [])]
        cpu = cpu_seconds(pids)
        start = time.perf_counter()
        deadline = start + config.seconds
        done = 0
        while done < calls:
            t = time.perf_counter()
            step(done)
            now = time.perf_counter()
            latencies[done] = now - t
            done += 1
            if now > deadline:
                break
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pids) - cpu
        p50, p90, p99 = np.percentile(latencies[:done], [50, 90, 99]) * 1e6
        worker_mib = _workers_mib(pids) if pids else None
        trainer_mib = _proc_mib(os.getpid(), "status", "VmRSS:")
    finally:
        envs.close()
    env_steps = done * per_call
    return Measurement(
        backend,
        case.env_id,
        num_envs,
        repeat,
        env_steps,
        elapsed,
        env_steps / elapsed,
        float(p50),
        float(p90),
        float(p99),
        startup,
        worker_mib,
        trainer_mib,
        cpu / env_steps * 1e6,
    )


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
                        result = measure(backend, case, n, repeat, config)
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


# ---------------------------------------------------------------------------------- command line


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _names(text))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def command_line(config: BenchConfig) -> str:
    """The `envfarm bench` command that runs exactly `config` (recorded with the results)."""
    return shlex.join(
        [
            "envfarm",
            "bench",
            "--envs",
            ",".join(config.envs),
            "--num-envs",
            ",".join(map(str, config.num_envs)),
            "--backends",
            ",".join(config.backends),
            "--repeats",
            str(config.repeats),
            "--steps",
            str(config.steps),
            "--seconds",
            f"{config.seconds:g}",
            "--synthetic-step-us",
            f"{config.synthetic_step_us:g}",
            "--synthetic-obs",
            "x".join(map(str, config.synthetic_obs)),
            "--loops",
            ",".join(config.loops),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `envfarm bench` options; unset ones take the defaults of the full or the --quick config."""
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
