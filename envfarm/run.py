"""`envfarm run`: a random policy in a local farm (or on a farm's workers), with a progress line and a summary."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import numpy as np

from envfarm.client import make_vec


@dataclass
class RunSummary:
    env_id: str
    num_envs: int
    num_workers: int
    steps: int
    episodes: int
    mean_return: float | None
    seconds: float
    steps_per_second: float


def run_random_policy(
    env_id: str,
    num_envs: int,
    steps: int,
    *,
    seed: int | None = 0,
    env_kwargs: dict[str, Any] | None = None,
    progress: TextIO | None = sys.stderr,
    **vector_kwargs: Any,
) -> RunSummary:
    """Steps `num_envs` envs with uniformly random actions until `steps` env steps are done."""
    envs = make_vec(env_id, num_envs, env_kwargs=env_kwargs, **vector_kwargs)
    try:
        envs.action_space.seed(seed)
        envs.reset(seed=seed)
        returns = np.zeros(num_envs)
        finished: list[float] = []
        done = 0
        interactive = progress is not None and progress.isatty()
        start = last_report = time.perf_counter()
        while done < steps:
            _, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
            done += num_envs
            returns += rewards
            ended = terminated | truncated
            if ended.any():
                finished.extend(returns[ended].tolist())
                returns[ended] = 0.0
            now = time.perf_counter()
            if progress is not None and (now - last_report > (0.25 if interactive else 5.0) or done >= steps):
                last_report = now
                bar = "#" * int(30 * min(done, steps) / steps)
                line = f"[{bar:<30}] {min(done, steps)}/{steps} steps  {done / (now - start):,.0f} steps/s  {len(finished)} episodes"
                progress.write(f"\r{line}" if interactive else f"{line}\n")
                progress.flush()
        seconds = time.perf_counter() - start
        if interactive:
            progress.write("\n")
        return RunSummary(
            env_id,
            num_envs,
            envs.num_workers,
            done,
            len(finished),
            float(np.mean(finished)) if finished else None,
            seconds,
            done / seconds,
        )
    finally:
        envs.close()


def format_summary(summary: RunSummary, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(summary))
    mean = "n/a (no episode ended)" if summary.mean_return is None else f"{summary.mean_return:.2f}"
    return (
        f"{summary.env_id}: {summary.steps} steps over {summary.num_envs} envs in {summary.num_workers} workers\n"
        f"  episodes     {summary.episodes}\n"
        f"  mean return  {mean}\n"
        f"  throughput   {summary.steps_per_second:,.0f} steps/s ({summary.seconds:.2f} s)"
    )
