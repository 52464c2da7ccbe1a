"""Heavy-tailed envs (envfarm/HeavyTail-v0 x8): envfarm's step against send/recv (batch 4) with the
trainer's and the workers' spin budgets at their defaults or 0, with CPU per env step (the trainer
and its workers), each run a process of its own, interleaved, medians of the repeats.

    python3 docs/measure/heavy_tail_spin.py 3     # repeats: about a minute on 2 CPUs
"""

import json
import statistics
import subprocess
import sys

ONE = r"""
import json, sys, time, warnings
from gymnasium.vector.utils import batch_space
import envfarm.client.worker_pool as worker_pool
from envfarm.bench_measure import cpu_seconds
warnings.filterwarnings("ignore")
mode, trainer_spin, worker_spin = sys.argv[1:4]
if trainer_spin != "-":
    worker_pool.TRAINER_SPIN_SECONDS = float(trainer_spin)
if worker_spin != "-":
    worker_pool.WORKER_SPIN_SECONDS = float(worker_spin)
import envfarm
from envfarm.bench_envs import HEAVY_TAIL_ID
n = 8
if mode == "step":
    envs = envfarm.make_vec(HEAVY_TAIL_ID, n)
    envs.reset(seed=0)
    actions = [envs.action_space.sample() for _ in range(64)]
    def one(i):
        envs.step(actions[i % 64])
        return n
else:
    envs = envfarm.make_vec(HEAVY_TAIL_ID, n, batch_size=n // 2)
    envs.async_reset(seed=0)
    space = batch_space(envs.single_action_space, n // 2)
    actions = [space.sample() for _ in range(64)]
    ids = envs.recv()[4]["env_id"]
    def one(i):
        global ids
        envs.send(actions[i % 64], ids)
        ids = envs.recv()[4]["env_id"]
        return n // 2
for i in range(10):
    one(i)
pids = [process.pid for process in envs.processes]
cpu, start, steps, i = cpu_seconds(pids), time.perf_counter(), 0, 0
while time.perf_counter() - start < 3:
    steps += one(i)
    i += 1
elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
envs.close()
print(json.dumps([steps / elapsed, cpu / steps * 1e6]))
"""
# (API, trainer spin, worker spin): "-" for the default budget
CONFIGS = [
    ("step", "-", "-"),
    ("sendrecv", "-", "-"),
    ("sendrecv", "-", "0"),
    ("sendrecv", "0", "-"),
    ("sendrecv", "0", "0"),
]

results: dict[tuple, list] = {config: [] for config in CONFIGS}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for config in CONFIGS:
        out = subprocess.run([sys.executable, "-c", ONE, *config], capture_output=True, text=True)
        results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
step = statistics.median(run[0] for run in results[CONFIGS[0]])
for (api, trainer_spin, worker_spin), runs in results.items():
    speed = statistics.median(run[0] for run in runs)
    cpu = statistics.median(run[1] for run in runs)
    print(
        f"{api:9} trainer spin {trainer_spin:2} worker spin {worker_spin:2} {speed:7,.0f} env-steps/s "
        f"{speed / step:5.2f}x step  CPU {cpu:5.0f} us/env-step  {[round(run[0]) for run in runs]}"
    )
