"""The default and inline arrangements with the trainer's spin budget at 0 (it sleeps on the futex at
once), against SyncVectorEnv: steps/s and CPU per env step (the trainer and its workers), each run a
process of its own, interleaved, medians of the repeats.

    python3 docs/measure/spin_off.py 3     # repeats: about 90 s on 2 CPUs
"""

import json
import statistics
import subprocess
import sys

ONE = r"""
import json, sys, time, warnings
import gymnasium as gym
import envfarm.client.worker_pool as worker_pool
from envfarm.bench_measure import cpu_seconds
warnings.filterwarnings("ignore")
env_id, n, trainer_spin, inline = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if trainer_spin != "-":
    worker_pool.TRAINER_SPIN_SECONDS = float(trainer_spin)
import envfarm
if env_id.startswith("sync:"):
    envs = gym.make_vec(env_id[5:], n, vectorization_mode="sync")
    pids = []
else:
    envs = envfarm.make_vec(env_id, n, inline_worker=inline)
    pids = [process.pid for process in envs.processes]
envs.reset(seed=0)
actions = [envs.action_space.sample() for _ in range(64)]
for i in range(50):
    envs.step(actions[i % 64])
cpu, start, steps = cpu_seconds(pids), time.perf_counter(), 0
while time.perf_counter() - start < 2.5:
    envs.step(actions[steps % 64])
    steps += 1
elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
envs.close()
print(json.dumps([steps * n / elapsed, cpu / (steps * n) * 1e6]))
"""
ENVS = [("CartPole-v1", 8), ("HalfCheetah-v5", 8)]
# (name, trainer spin seconds or "-" for the default, inline_worker)
CONFIGS = [
    ("sync", "-", "0"),
    ("default", "-", "0"),
    ("trainer spin 0", "0", "0"),
    ("inline", "-", "1"),
    ("inline, trainer spin 0", "0", "1"),
]

results: dict[tuple, list] = {}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for env_id, n in ENVS:
        for name, trainer_spin, inline in CONFIGS:
            which = "sync:" + env_id if name == "sync" else env_id
            out = subprocess.run(
                [sys.executable, "-c", ONE, which, str(n), trainer_spin, inline], capture_output=True, text=True
            )
            results.setdefault((env_id, n, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
for env_id, n in ENVS:
    sync = statistics.median(run[0] for run in results[(env_id, n, "sync")])
    for name, *_ in CONFIGS:
        runs = results[(env_id, n, name)]
        speed = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        print(
            f"{env_id} x{n} {name:24} {speed:9,.0f} steps/s {speed / sync:5.2f}x sync  "
            f"CPU {cpu:6.1f} us/env-step  runs {[round(run[0]) for run in runs]}"
        )
