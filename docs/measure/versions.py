"""envfarm now against an earlier envfarm, SyncVectorEnv the anchor: steps/s of a random-policy
loop, each measurement in its own process, interleaved, medians of the repeats.

The earlier version runs from another interpreter that has it installed, e.g. for commit c8a1ea8:

    git worktree add /tmp/old c8a1ea8
    python3 -m venv --system-site-packages /tmp/oldvenv && /tmp/oldvenv/bin/pip install --no-deps -e /tmp/old
    python3 docs/measure/versions.py /tmp/oldvenv/bin/python 3
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

CASES = [("CartPole-v1", 8, 3000), ("CartPole-v1", 16, 2000), ("HalfCheetah-v5", 8, 1000)]
if len(sys.argv) > 3:  # a subset: "CartPole-v1:8,HalfCheetah-v5:8"
    CASES = [(case.split(":")[0], int(case.split(":")[1]), 3000) for case in sys.argv[3].split(",")]

ONE = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import gymnasium as gym
arrangement, env_id, num_envs, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if arrangement == "sync":
    envs = gym.make_vec(env_id, num_envs, vectorization_mode="sync")
else:
    import envfarm
    envs = envfarm.make_vec(env_id, num_envs, **({"inline_worker": True, "num_workers": 2} if arrangement == "inline" else {}))
envs.reset(seed=0)
actions = [envs.action_space.sample() for _ in range(64)]
for i in range(100):
    envs.step(actions[i % 64])
start = time.perf_counter()
for i in range(steps):
    envs.step(actions[i % 64])
print(json.dumps(steps * num_envs / (time.perf_counter() - start)))
envs.close()
"""


def main() -> None:
    earlier, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    arms = {
        "sync": [sys.executable, "sync"],
        "earlier": [earlier, "envfarm"],
        "now": [sys.executable, "envfarm"],
        "now, inline_worker": [sys.executable, "inline"],
    }
    for env_id, num_envs, steps in CASES:
        results: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]  # no arm always follows the same one
            for name in order:
                python, arrangement = arms[name]
                run = subprocess.run(
                    [python, "-c", ONE, arrangement, env_id, str(num_envs), str(steps)], capture_output=True, text=True
                )
                if run.returncode != 0:
                    raise SystemExit(f"{name} failed: {run.stderr[-1000:]}")
                results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
        anchor = statistics.median(results["sync"])
        cells = ", ".join(f"{name} {statistics.median(values) / anchor:.2f}x" for name, values in results.items())
        print(f"{env_id} x{num_envs}: {cells} (sync {anchor:.0f} steps/s)", flush=True)
        for name, values in results.items():
            print(f"    {name}: {', '.join(f'{v:.0f}' for v in values)}", flush=True)


if __name__ == "__main__":
    main()
