"""Steps/s of a real training loop: the PPO of examples/ppo.py (rollout with the torch policy, plus
the PPO update) on CartPole-v1, SyncVectorEnv against envfarm (default, inline_worker=True, and the
send/recv rollout of examples/ppo_send_recv.py), each with torch's default threads and with
torch.set_num_threads(1).

Every run is a subprocess of its own, so that a process-wide setting (torch's threads, a worker's
imports) never leaks into the SyncVectorEnv baseline; runs are interleaved (one of each
configuration, then again) and repeated, and the medians are printed with their ratio to
SyncVectorEnv with the same torch threads and to SyncVectorEnv with torch's defaults.

Each run trains a fresh agent, seed 1, for a fixed number of env steps: every configuration does
the same learning work (the same rollout size and update), so only the loop's speed differs.
send/recv runs num_envs envs in batches of num_envs / 2, with rollouts of 256 batches: as many
transitions per update as the others' 128 steps x num_envs.

With --heavy-tail, each CartPole step also burns CPU as envfarm's HeavyTail bench env does (200 us,
one step in ten 20x longer): envs that cost more than the policy, and unevenly. With --busy N, N
busy processes spin beside each run, as other work on a shared machine.

    python3 docs/measure/training_loop.py                                          # x8 and x16, 3 repeats: ~8 minutes on 2 CPUs
    python3 docs/measure/training_loop.py --num-envs 8 --heavy-tail --steps 10000  # ~5 minutes
    python3 docs/measure/training_loop.py --num-envs 8 --busy 1 --steps 4096       # ~3 minutes

docs/training.md has the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
VECTORS = ["sync", "envfarm", "envfarm inline_worker", "envfarm send/recv"]
THREADS = [0, 1]  # 0: torch's default


class HeavyTail(gym.Wrapper):
    """Each step burns 200 us of CPU, one in ten 4 ms (envfarm.bench_envs' HeavyTail-v0 costs)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.rng = np.random.default_rng()

    def step(self, action: Any) -> Any:
        cost_ns = 200_000 * (20 if self.rng.random() < 0.1 else 1)
        deadline = time.thread_time_ns() + cost_ns  # CPU time, not wall time: a descheduled env still pays in full
        while time.thread_time_ns() < deadline:
            pass
        return self.env.step(action)


def run_one(vector: str, num_envs: int, threads: int, steps: int, heavy_tail: bool) -> dict[str, float]:
    """One training run in this process (the child's side)."""
    import torch
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, EXAMPLES)
    import ppo
    import ppo_send_recv

    import envfarm

    wrappers = [HeavyTail] if heavy_tail else []
    config, train = ppo.PPOConfig(), ppo.train
    if vector == "sync":
        envs = gym.make_vec(
            ppo.ENV_ID,
            num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": ppo.AUTORESET},
            wrappers=wrappers,
        )
        envs = RecordEpisodeStatistics(envs, buffer_length=ppo.REPORT_EPISODES)
    elif vector == "envfarm send/recv":
        envs = envfarm.make_vec(
            ppo.ENV_ID, num_envs, batch_size=num_envs // 2, autoreset_mode=ppo.AUTORESET, wrappers=wrappers
        )
        config = dataclasses.replace(config, num_steps=2 * config.num_steps)
        train = ppo_send_recv.train_send_recv
    else:
        inline = {"inline_worker": True} if vector == "envfarm inline_worker" else {}
        envs = envfarm.make_vec(ppo.ENV_ID, num_envs, autoreset_mode=ppo.AUTORESET, wrappers=wrappers, **inline)
        envs = RecordEpisodeStatistics(envs, buffer_length=ppo.REPORT_EPISODES)
    try:
        result = train(envs, steps, seed=1, config=config, log_every=0)
    finally:
        envs.close()
    return {
        "steps_per_second": result.steps_per_second,
        "rollout_share": result.rollout_seconds / result.seconds,
        "torch_threads": torch.get_num_threads(),
    }


def run_in_subprocess(
    vector: str, num_envs: int, threads: int, steps: int, heavy_tail: bool, busy: int
) -> dict[str, float]:
    """One run in a child process, beside `busy` processes that spin for as long as it runs (a shared machine)."""
    spec = json.dumps(
        {"vector": vector, "num_envs": num_envs, "threads": threads, "steps": steps, "heavy_tail": heavy_tail}
    )
    spin = (
        "import time\nend = time.monotonic() + 900\nwhile time.monotonic() < end: pass"  # ends by itself, should we not
    )
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(busy)]
    try:
        result = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, timeout=600)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    if result.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30_000, help="env steps per run")
    parser.add_argument("--heavy-tail", action="store_true", help="each step also burns 200 us of CPU, one in ten 4 ms")
    parser.add_argument(
        "--busy", type=int, default=0, help="busy processes beside each run, as other work on a shared machine"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one run, printed as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return

    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; {args.steps:,} steps a run, {args.repeats} repeats",
        flush=True,
    )
    for num_envs in args.num_envs:
        configs = [(vector, threads) for threads in THREADS for vector in VECTORS]
        runs: dict[tuple[str, int], list[dict[str, float]]] = {config: [] for config in configs}
        for repeat in range(args.repeats):
            for vector, threads in configs:
                runs[vector, threads].append(
                    run_in_subprocess(vector, num_envs, threads, args.steps, args.heavy_tail, args.busy)
                )
            print(f"  x{num_envs}: repeat {repeat + 1} of {args.repeats} done", flush=True)

        median = {config: statistics.median(r["steps_per_second"] for r in values) for config, values in runs.items()}
        setting = (
            f"CartPole-v1 x{num_envs}"
            + (" with heavy-tailed step costs" if args.heavy_tail else "")
            + (f", beside {args.busy} busy process(es)" if args.busy else "")
        )
        print(f"\nPPO training loop, {setting}: medians of {args.repeats} (all runs' steps/s in brackets)")
        for vector, threads in configs:
            values = runs[vector, threads]
            name = f"{vector}, torch threads {values[0]['torch_threads']}" + (" (default)" if threads == 0 else "")
            share = statistics.median(r["rollout_share"] for r in values)
            all_runs = ", ".join(f"{r['steps_per_second']:.0f}" for r in values)
            print(
                f"  {name:<48} {median[vector, threads]:>6,.0f} steps/s  {median[vector, threads] / median['sync', threads]:.2f}x sync (same threads)  "
                f"{median[vector, threads] / median['sync', 0]:.2f}x sync (torch default)  rollout {share:.0%}  [{all_runs}]"
            )


if __name__ == "__main__":
    main()
