"""The trainer's pieces of one vector step, each timed alone (timeit, best of 3), on an inline
FarmVectorEnv: what a step costs around the envs, piece by piece.

    python3 docs/measure/step_pieces.py CartPole-v1 8
"""

import sys
import timeit
import warnings

import envfarm
from envfarm.client.checks import action_leaves
from envfarm.client.errors import raise_env_errors
from envfarm.protocol import messages as m
from envfarm.transport import channel

warnings.filterwarnings("ignore")
env_id, num_envs = sys.argv[1], int(sys.argv[2])
envs = envfarm.make_vec(env_id, num_envs, inline_worker=True, num_workers=2)
envs.reset(seed=0)
actions = envs.action_space.sample()
buffer = envs._pool.buffer
worker, inline = envs._pool.workers
mailbox = envs._pool.router.channels.requests[worker.index]
leaves = action_leaves(envs.single_action_space, actions, num_envs)
block = slice(worker.env_ids.start, worker.env_ids.stop)
record = [m.step_record(5)]
result_record = [memoryview(m.result_record(5))]
in_shared_memory = {"rewards": None, "terminated": None, "truncated": None}
replies = [(worker, {"kind": m.RESULT, "errors": []}), (inline, {"kind": m.RESULT, "errors": []})]
PIECES = [
    ("check the actions (action_leaves)", lambda: action_leaves(envs.single_action_space, actions, num_envs)),
    ("write the actions into shared memory", lambda: buffer.write_actions(slice(None), leaves)),
    ("a worker's action payload", lambda: buffer.action_payload(leaves, block, True)),
    ("make a STEP message", lambda: m.make(m.STEP, 5, envs=worker.env_list, actions=[None])),
    ("write a step record into a mailbox", lambda: mailbox.write(record)),
    ("wake the worker (futex)", lambda: channel.futex_wake(mailbox.seq)),
    ("read a result record", lambda: m.read_result_record(result_record)),
    ("write a reply's results (in shared memory)", lambda: buffer.write_results(block, in_shared_memory)),
    ("which envs ended", lambda: envs._shared.ended.__setitem__(slice(None), buffer.terminations | buffer.truncations)),
    ("raise_env_errors, none", lambda: raise_env_errors(replies)),
    ("copy the observations out (batch)", lambda: buffer.batch(True)),
    (
        "copy rewards, terminations, truncations",
        lambda: (buffer.rewards.copy(), buffer.terminations.copy(), buffer.truncations.copy()),
    ),
    ("a whole step", lambda: envs.step(actions)),
]
for label, piece in PIECES:
    number = 5000 if label == "a whole step" else 20000
    seconds = min(timeit.repeat(piece, number=number, repeat=3)) / number
    print(f"{label:44} {seconds * 1e6:7.2f} us")
envs.close()
