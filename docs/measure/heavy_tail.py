"""Heavy-tailed envs (envfarm/HeavyTail-v0: 200 us a step, one in ten 20x longer): envfarm's step()
against the send/recv API (batch_size = num_envs / 2) with the default and more worker processes,
each run a process of its own, interleaved, medians of the repeats.

    python3 docs/measure/heavy_tail.py 8 3     # num_envs, repeats: about 3 minutes on 2 CPUs
"""

import json
import statistics
import subprocess
import sys

ONE = r"""
import sys, time, json, numpy as np, envfarm, warnings
warnings.filterwarnings("ignore")
from envfarm.bench_envs import HEAVY_TAIL_ID
mode, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kw = {"num_workers": workers} if workers else {}
if mode == "step":
    envs = envfarm.make_vec(HEAVY_TAIL_ID, n, **kw); envs.reset(seed=0)
    acts = [envs.action_space.sample() for _ in range(64)]
    for i in range(10): envs.step(acts[i % 64])
    t = time.perf_counter(); steps = 0
    while time.perf_counter() - t < 3: envs.step(acts[steps % 64]); steps += 1
    sps = steps * n / (time.perf_counter() - t)
else:
    b = n // 2
    envs = envfarm.make_vec(HEAVY_TAIL_ID, n, batch_size=b, **kw); envs.async_reset(seed=0)
    from gymnasium.vector.utils import batch_space
    sp = batch_space(envs.single_action_space, b); acts = [sp.sample() for _ in range(64)]
    ids = envs.recv()[4]["env_id"]
    for i in range(10): envs.send(acts[i % 64], ids); ids = envs.recv()[4]["env_id"]
    t = time.perf_counter(); steps = 0
    while time.perf_counter() - t < 3: envs.send(acts[steps % 64], ids); ids = envs.recv()[4]["env_id"]; steps += 1
    sps = steps * b / (time.perf_counter() - t)
envs.close(); print(json.dumps(sps))
"""
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
configs = [("step", 0), ("sendrecv", 0), ("sendrecv", n // 2), ("sendrecv", n), ("step", n)]
res = {c: [] for c in configs}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for c in configs:
        out = subprocess.run([sys.executable, "-c", ONE, c[0], str(n), str(c[1])], capture_output=True, text=True)
        res[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
base = statistics.median(res[("step", 0)])
for c, v in res.items():
    print(
        f"{c[0]:9} workers={c[1] or 'default':7} {statistics.median(v):8.0f} steps/s  {statistics.median(v) / base:.2f}x envfarm step  {[round(x) for x in v]}"
    )
