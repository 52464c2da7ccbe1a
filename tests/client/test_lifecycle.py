"""Workers never outlive the trainer, nothing leaks, and a dead worker is reported, not waited for."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from interrupts import interrupt_the_next_mailbox_write
from polling import wait_until
from testenvs import CounterEnv, ScriptedEnv

import envfarm

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_segments(pid: int | None = None) -> set[str]:
    """The shared-memory segments that the trainer with this pid (default: this process) created."""
    prefix = f"envfarm_{os.getpid() if pid is None else pid}_"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_close_frees_processes_and_shared_memory():
    before = shm_segments()
    envs = envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, obs="image")] * 4, num_workers=2)
    assert shm_segments() - before  # the observation buffer and the message channel
    envs.reset(seed=0)
    pids = [p.pid for p in envs.processes]
    envs.close()
    assert not any(pid_alive(pid) for pid in pids)
    assert shm_segments() == before


def test_garbage_collection_frees_everything():
    before = shm_segments()
    envs = envfarm.FarmVectorEnv([ScriptedEnv] * 2, num_workers=2)
    pids = [p.pid for p in envs.processes]
    del envs
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5)
    assert shm_segments() == before


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_killed_worker_is_reported_by_name_within_a_bounded_time(context):
    before = shm_segments()
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=0.01)] * 4, num_workers=2, context=context)
    try:
        envs.reset()
        victim = envs.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(
            envfarm.WorkerDiedError, match=rf"worker 1 \(.*pid {victim.pid}, envs 2-3\) was killed by SIGKILL"
        ):
            envs.step(np.zeros(4, dtype=np.int64))
        assert time.monotonic() - start < 2
        with pytest.raises(envfarm.WorkerDiedError, match="close\\(\\) this vector env"):
            envs.step(np.zeros(4, dtype=np.int64))
    finally:
        envs.close()
    assert shm_segments() == before
    assert not pid_alive(envs.processes[0].pid)


def test_worker_that_dies_mid_step_is_reported():
    envs = envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, crash_at_step=2)] * 2, num_workers=2)
    try:
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        with pytest.raises(envfarm.WorkerDiedError, match="was killed by SIGKILL"):
            envs.step(np.zeros(2, dtype=np.int64))
    finally:
        envs.close()


def test_hung_env_close_is_bounded_and_kills_it():
    envs = envfarm.FarmVectorEnv([functools.partial(CounterEnv, step_sleep=3600)] * 2, num_workers=1)
    envs.reset()
    envs.step_async(np.zeros(2, dtype=np.int64))
    with pytest.raises(multiprocessing.TimeoutError):
        envs.step_wait(timeout=0.2)
    start = time.monotonic()
    envs.close(timeout=1)
    assert time.monotonic() - start < 4
    assert not envs.processes[0].is_alive()


def run_trainer(script: str) -> subprocess.Popen:
    code = textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


TRAINER = """
    import functools, os, signal, sys, numpy as np, envfarm
    # As in a terminal. A test run started in the background (`pytest &` in a script) ignores
    # SIGINT, and its children inherit that: this trainer would never see the Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from testenvs import ScriptedEnv
    envs = envfarm.FarmVectorEnv([functools.partial(ScriptedEnv, obs="image")] * 4, num_workers=2, context="{context}")
    envs.reset(seed=0)
    print(" ".join(str(p.pid) for p in envs.processes), flush=True)
    while True:
        envs.step(np.zeros(4, dtype=np.int64))
"""


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_exit_and_shared_memory_is_freed_when_the_trainer_is_killed(context):
    trainer = run_trainer(TRAINER.format(context=context))
    try:
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(pids) == 2, trainer.stderr.read()
        assert shm_segments(trainer.pid)  # the batch buffer and the message channel
        trainer.kill()
        trainer.wait(10)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5), "workers outlived the trainer"
        assert wait_until(lambda: not shm_segments(trainer.pid), 5), "shared memory outlived the trainer"
    finally:
        trainer.kill()
        trainer.wait()


def test_ctrl_c_gives_one_clean_keyboard_interrupt():
    trainer = run_trainer(TRAINER.format(context="fork"))
    try:
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        time.sleep(0.3)
        # Ctrl-C in a terminal signals the whole foreground process group: trainer and workers.
        for pid in [trainer.pid, *pids]:
            os.kill(pid, signal.SIGINT)
        _, stderr = trainer.communicate(timeout=15)
        assert stderr.count("KeyboardInterrupt") == 1, stderr
        assert stderr.count("Traceback") == 1, stderr
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5)
        assert wait_until(lambda: not shm_segments(trainer.pid), 5)
    finally:
        trainer.kill()
        trainer.wait()


def test_the_next_step_is_answered_after_ctrl_c_cut_a_step_short(monkeypatch):
    # In a notebook, Ctrl-C during a step and then stepping again is common. If the interrupt
    # lands while a request is written to a worker's mailbox, the write is left half done; the
    # next step must still reach the worker (it timed out for ever before).
    from envfarm.transport import channel

    if not channel.available():
        pytest.skip("the channel needs Linux on x86-64")
    envs = envfarm.FarmVectorEnv([CounterEnv] * 2, num_workers=1)
    try:
        envs.reset()
        interrupt_the_next_mailbox_write(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            envs.step(np.zeros(2, dtype=np.int64))
        envs.step_async(np.zeros(2, dtype=np.int64))
        _, _, _, _, info = envs.step_wait(timeout=30)
        assert info["count"].tolist() == [1, 1]  # the interrupted step never ran
    finally:
        envs.close()


@pytest.mark.parametrize("setting, expected", [(None, 1), ("0", None)], ids=["default", "left-alone"])
def test_workers_limit_their_numeric_libraries_to_one_thread(setting, expected, monkeypatch):
    from testenvs import FixedObsEnv
    from threadpoolctl import threadpool_info

    if setting is not None:
        monkeypatch.setenv("ENVFARM_WORKER_THREADS", setting)
    here = max(pool["num_threads"] for pool in threadpool_info())
    envs = envfarm.FarmVectorEnv([FixedObsEnv] * 2, num_workers=2, context="spawn")
    try:
        assert envs.call("blas_threads") == ((expected or here),) * 2
    finally:
        envs.close()
