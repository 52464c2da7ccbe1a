"""The training loops of `envfarm bench`: each backend stepped by a torch policy, as users train.

A random policy costs the trainer nothing and leaves every core to the envs; a real policy takes
CPU between steps and torch's threads busy-wait on the cores the workers need. So beside the
`random` loop (envfarm/bench_measure.py), the bench runs:

- `mlp`: CleanRL's agent (two hidden layers of 64 tanh units, actor and critic) picks every action,
  under torch's default threads;
- `ppo`: the same, plus a PPO update every ROLLOUT steps (GAE, 4 epochs of 4 minibatches with
  Adam): the loop of examples/ppo.py, with its learning left out of the timing's concerns;
- `mlp-1t`, `ppo-1t`: the same with torch.set_num_threads(1).

Every measurement runs in a fresh process: torch's thread count is process-wide, and the
SyncVectorEnv anchor must run with the user's defaults, untouched by what another backend set.
The timed part is whole rollouts (and their updates), so steps/s is what a training run sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from typing import Any

import numpy as np

from envfarm.bench_config import BenchConfig, EnvCase
from envfarm.bench_measure import Measurement, cpu_seconds, start_envs, trainer_rss_mib, workers_pss_mib

LOOPS = ("random", "mlp", "mlp-1t", "ppo", "ppo-1t")
ROLLOUT = 128  # steps per env between two PPO updates (CleanRL's num_steps)
EPOCHS, MINIBATCHES = 4, 4
STEP_BACKENDS = ("sync", "async", "envpool", "envfarm", "envfarm-wire", "envfarm-inline", "ideal")
CHILD_TIMEOUT = 600  # seconds for one measurement's process, startup included


def check_loops(loops: tuple[str, ...]) -> str | None:
    """Why these loops cannot run here (None: they can)."""
    for loop in loops:
        if loop not in LOOPS:
            raise ValueError(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")
    if any(loop != "random" for loop in loops):
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed (pip install torch)"
    return None


def measure(backend: str, case: EnvCase, num_envs: int, repeat: int, config: BenchConfig, loop: str) -> Measurement:
    """One training-loop measurement, in a process of its own."""
    spec = {
        "backend": backend,
        "case": dataclasses.asdict(case),
        "num_envs": num_envs,
        "seed": config.seed + repeat,
        "loop": loop,
        "seconds": config.seconds,
        "steps": config.steps,
    }
    result = subprocess.run(
        [sys.executable, "-m", "envfarm.bench_training", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the measuring process exited with {result.returncode}")
    fields = json.loads(result.stdout.strip().splitlines()[-1])
    return Measurement(backend=backend, env_id=case.env_id, num_envs=num_envs, repeat=repeat, loop=loop, **fields)


# ------------------------------------------------------------------------- the measuring process


def _agent(torch: Any, obs_size: int, action_space: Any) -> Any:
    """CleanRL's actor-critic for a Discrete or a Box action space."""
    from gymnasium import spaces
    from torch import nn

    def layer(i: int, o: int, std: float = math.sqrt(2)) -> nn.Linear:
        linear = nn.Linear(i, o)
        nn.init.orthogonal_(linear.weight, std)
        nn.init.constant_(linear.bias, 0.0)
        return linear

    discrete = isinstance(action_space, spaces.Discrete)
    outputs = int(action_space.n) if discrete else int(np.prod(action_space.shape))

    class Agent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.critic = nn.Sequential(layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 1, 1.0))
            self.actor = nn.Sequential(
                layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, outputs, 0.01)
            )
            self.log_std = nn.Parameter(torch.zeros(outputs))

        def act(self, obs: Any, action: Any = None) -> tuple[Any, Any, Any, Any]:
            out = self.actor(obs)
            if discrete:
                dist = torch.distributions.Categorical(logits=out, validate_args=False)
            else:
                dist = torch.distributions.Normal(out, self.log_std.exp(), validate_args=False)
            if action is None:
                action = dist.sample()
            log_prob, entropy = dist.log_prob(action), dist.entropy()
            if not discrete:
                log_prob, entropy = log_prob.sum(-1), entropy.sum(-1)
            return action, log_prob, entropy, self.critic(obs).squeeze(-1)

    return Agent()


def _update(torch: Any, agent: Any, optimizer: Any, rollout: dict[str, Any], next_value: Any) -> None:
    """One PPO update on a rollout: GAE, then EPOCHS passes of MINIBATCHES clipped-surrogate steps."""
    rewards, values, dones = rollout["rewards"], rollout["values"], rollout["dones"]
    advantages = torch.zeros_like(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        following = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + 0.99 * following * (1.0 - dones[t]) - values[t]
        last = delta + 0.99 * 0.95 * (1.0 - dones[t]) * last
        advantages[t] = last
    returns = advantages + values
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in rollout.items()}
    flat_advantages, flat_returns = advantages.reshape(-1), returns.reshape(-1)
    size = len(flat_returns)
    for _ in range(EPOCHS):
        order = torch.randperm(size)
        for start in range(0, size, max(1, size // MINIBATCHES)):
            idx = order[start : start + max(1, size // MINIBATCHES)]
            _, log_prob, entropy, value = agent.act(flat["obs"][idx], flat["actions"][idx])
            ratio = (log_prob - flat["log_probs"][idx]).exp()
            adv = flat_advantages[idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            value_loss = 0.5 * ((value - flat_returns[idx]) ** 2).mean()
            loss = policy_loss + 0.5 * value_loss - 0.01 * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
            optimizer.step()


def run_loop(
    backend: str, case: dict[str, Any], num_envs: int, seed: int, loop: str, seconds: float, steps: int
) -> dict:
    """The measuring process: builds the backend, runs the loop, returns the Measurement's fields."""
    import torch

    if loop.endswith("-1t"):
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    begin = time.perf_counter()
    envs, _, _ = start_envs(backend, EnvCase(**case), num_envs, seed)
    startup = time.perf_counter() - begin
    try:
        space = envs.single_action_space
        obs_size = int(np.prod(envs.single_observation_space.shape))
        agent = _agent(torch, obs_size, space)
        optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
        updates = loop.startswith("ppo")
        latencies: list[float] = []
        obs = envs.step(np.stack([space.sample() for _ in range(num_envs)]))[0]  # a first observation for every backend

        def rollout(length: int) -> None:
            nonlocal obs
            stored: dict[str, list[Any]] = {
                k: [] for k in ("obs", "actions", "log_probs", "values", "rewards", "dones")
            }
            for _ in range(length):
                tensor = torch.as_tensor(np.asarray(obs, np.float32).reshape(num_envs, obs_size))
                with torch.no_grad():
                    action, log_prob, _, value = agent.act(tensor)
                actions = action.numpy().astype(space.dtype)
                t = time.perf_counter()
                obs, rewards, terminated, truncated, _ = envs.step(actions)
                latencies.append(time.perf_counter() - t)
                if updates:
                    done = torch.as_tensor(terminated | truncated, dtype=torch.float32)
                    for key, value_ in zip(
                        stored, (tensor, action, log_prob, value, torch.as_tensor(rewards).float(), done)
                    ):
                        stored[key].append(value_)
            if updates:
                with torch.no_grad():
                    tensor = torch.as_tensor(np.asarray(obs, np.float32).reshape(num_envs, obs_size))
                    next_value = agent.act(tensor)[3]
                _update(torch, agent, optimizer, {k: torch.stack(v) for k, v in stored.items()}, next_value)

        length = ROLLOUT if updates else max(1, min(ROLLOUT, steps // num_envs))
        rollout(length)  # warm-up: torch's first passes, the workers' first steps
        latencies.clear()
        pids = [p.pid for p in getattr(envs, "processes", [])]
        cpu, start = cpu_seconds(pids), time.perf_counter()
        done = 0
        while True:
            rollout(length)
            done += length * num_envs
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (not updates and done >= steps):
                break
        cpu = cpu_seconds(pids) - cpu
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e6
        worker_mib = workers_pss_mib(pids) if pids else None
    finally:
        envs.close()
    return {
        "env_steps": done,
        "seconds": elapsed,
        "steps_per_s": done / elapsed,
        "p50_us": float(p50),
        "p90_us": float(p90),
        "p99_us": float(p99),
        "startup_s": startup,
        "worker_mib": worker_mib,
        "trainer_mib": trainer_rss_mib(),
        "cpu_us_per_step": cpu / done * 1e6,
    }


if __name__ == "__main__":
    print(json.dumps(run_loop(**json.loads(sys.argv[1]))))
