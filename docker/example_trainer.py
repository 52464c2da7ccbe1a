"""A trainer on the host using the compose farm: `python3 docker/example_trainer.py [tcp://127.0.0.1:5555]`.

Asks the broker what is free (as `envfarm status` does), leases up to 16 CartPole envs so that one
worker stays spare, for `on_failure="restart"` to rebuild a lost worker's envs on, and says so;
then runs a random policy, says whether the workers share memory with it, and prints throughput
and how many envs had to be restarted. With the Curve farm (docker/compose.curve.yml), add
`--curve keys/trainer.key_secret keys/broker.key`.
"""

import argparse
import sys
import time

import numpy as np

import envfarm
from envfarm.status import is_free, query

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("broker", nargs="?", default="tcp://127.0.0.1:5555")
parser.add_argument("--envs", type=int, default=16, help="envs to lease at most (default 16)")
parser.add_argument("--steps", type=int, default=50_000, help="env steps in all (default 50000)")
parser.add_argument("--curve", nargs=2, metavar=("SECRET_KEY", "BROKER_KEY"), help="CurveZMQ key files")
parser.add_argument("--listen", help="where the workers reach this trainer, if not where the broker sees it")
args = parser.parse_args()
curve = tuple(args.curve) if args.curve else None

# Spare capacity, from the broker's status: the slots of the workers it would lease out now
# (unleased and heard from lately: a worker killed a moment ago is listed, but not free).
try:
    free = [w["slots"] for w in query(args.broker, curve, timeout=10)["workers"] if is_free(w)]
except TimeoutError as e:
    sys.exit(f"{e} (a farm with Curve on answers only with --curve)")
if not free:
    sys.exit(f"the farm at {args.broker} has no free worker")
spare = max(free)  # a lost worker's envs are rebuilt on one free worker: the largest is kept
if len(free) > 1:
    num_envs = min(args.envs, sum(free) - spare)
    print(
        f"the farm has {len(free)} free workers ({sum(free)} slots): leasing {num_envs} envs, "
        f"leaving 1 worker ({spare} slots) spare for on_failure='restart'"
    )
else:
    num_envs = min(args.envs, spare)
    print(f"the farm has 1 free worker: leasing {num_envs} envs with no spare (a lost worker ends the run)")

envs = envfarm.make_vec(
    "CartPole-v1", num_envs, broker=args.broker, on_failure="restart", curve=curve, listen=args.listen
)
try:
    shared = sum(worker.shared_memory for worker in envs._workers)
    if shared:
        print(f"shared memory: in use with {shared} of {envs.num_workers} workers")
    else:
        print(
            "shared memory: not in use, observations travel on the socket (workers on this host share it "
            "when they run as this user: ENVFARM_UID=$(id -u))"
        )
    envs.reset(seed=0)
    restarted, start, steps = 0, time.perf_counter(), 0
    while steps < args.steps:
        _, _, _, _, info = envs.step(envs.action_space.sample())
        restarted += int(np.sum(info.get("_envfarm_restarted", 0)))
        steps += envs.num_envs
    print(
        f"{steps} steps from {envs.num_workers} farm workers at {steps / (time.perf_counter() - start):,.0f} steps/s; "
        f"{restarted} envs restarted"
    )
finally:
    envs.close()
