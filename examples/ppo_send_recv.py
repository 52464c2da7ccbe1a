"""The PPO of examples/ppo.py, with an EnvPool-style asynchronous rollout: envfarm's send/recv.

    python3 examples/ppo_send_recv.py                  # 8 envs, in batches of 4
    python3 examples/ppo_send_recv.py --compare        # then ppo.py's synchronous loop on the same 8 envs

There are twice as many envs as the policy takes at once (num_envs = 2 x batch_size): `recv`
returns the first batch of envs that are ready, and while the policy computes their actions, the
other half steps. The agent, GAE, the PPO update and its settings are ppo.py's, and so is the
rollout's size: 128 x num_envs transitions, ~128 steps of each env. Only the order of the steps differs.

Envs come back in varying order, so each env's transitions are kept in a list of its own (by
info["env_id"]) and GAE runs over each env's list: a step's next state is that env's next state,
never another env's that happened to come back in the row after it.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import ppo  # examples/ppo.py, beside this file
import torch
from ppo import Agent, PPOConfig, TrainResult, anneal, bootstrap_truncated, compute_gae, ppo_update

import envfarm
from envfarm import FarmVectorEnv


class Trajectories:
    """Per env: the transitions completed in this rollout, in that env's order, and the one in flight.

    A transition starts when its action is sent (obs, action, log-probability, value) and is
    completed by the env's next `recv` (reward, done). The transition in flight when a rollout
    ends is completed in the next one; its value is the bootstrap value for this one.
    """

    def __init__(self, num_envs: int):
        self.completed: list[list[tuple]] = [[] for _ in range(num_envs)]
        self.in_flight: list[tuple | None] = [None] * num_envs

    def complete(self, env_ids: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> int:
        """Records the results of the envs just received; returns how many transitions that completed
        (an env's first recv after a reset completes none)."""
        count = 0
        for env_id, reward, done in zip(env_ids, rewards, dones):
            if self.in_flight[env_id] is not None:
                self.completed[env_id].append((*self.in_flight[env_id], float(reward), float(done)))
                count += 1
        return count

    def start(
        self, env_ids: np.ndarray, obs: np.ndarray, actions: np.ndarray, logprobs: np.ndarray, values: np.ndarray
    ) -> None:
        for row, env_id in enumerate(env_ids):
            self.in_flight[env_id] = (obs[row], actions[row], logprobs[row], values[row])

    def take_batch(self, config: PPOConfig) -> dict[str, torch.Tensor]:
        """This rollout as one flat batch for ppo_update, with GAE computed env by env; starts the next rollout."""
        parts = []
        for env_id, steps in enumerate(self.completed):
            if not steps:
                continue
            obs, actions, logprobs, values, rewards, dones = (np.array(column) for column in zip(*steps))
            next_value = self.in_flight[env_id][3]  # V(the state after this env's last completed step)
            advantages, returns = compute_gae(rewards, values, dones, next_value, config.gamma, config.gae_lambda)
            parts.append(
                {"obs": obs, "actions": actions, "logprobs": logprobs, "advantages": advantages, "returns": returns}
            )
        self.completed = [[] for _ in self.completed]
        return {key: torch.as_tensor(np.concatenate([part[key] for part in parts])) for key in parts[0]}


class EpisodeReturns:
    """Each env's running return, and the returns of the episodes that ended (RecordEpisodeStatistics
    wraps step(), not recv(), so send/recv keeps its own)."""

    def __init__(self, num_envs: int):
        self.running = np.zeros(num_envs)
        self.ended: collections.deque[float] = collections.deque(maxlen=ppo.REPORT_EPISODES)
        self.count = 0

    def add(self, env_ids: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.running[env_ids] += rewards
        for env_id in env_ids[dones]:
            self.ended.append(self.running[env_id])
            self.running[env_id] = 0.0
            self.count += 1


def train_send_recv(
    envs: FarmVectorEnv,
    total_timesteps: int,
    seed: int,
    time_budget: float | None = None,
    config: PPOConfig = PPOConfig(),
    log_every: int = 10,
) -> TrainResult:
    """ppo.train with a send/recv rollout: each update takes `config.num_steps` batches of `envs.batch_size` transitions."""
    torch.manual_seed(seed)
    obs_size = int(np.prod(envs.single_observation_space.shape))
    agent = Agent(obs_size, int(envs.single_action_space.n))
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
    trajectories, episodes = Trajectories(envs.num_envs), EpisodeReturns(envs.num_envs)

    envs.async_reset(seed=seed)
    steps, iteration, rollout_seconds = 0, 0, 0.0
    start = time.perf_counter()
    while steps < total_timesteps and (time_budget is None or time.perf_counter() - start < time_budget):
        elapsed = time.perf_counter() - start
        anneal(optimizer, config, max(steps / total_timesteps, elapsed / time_budget if time_budget else 0.0))
        rollout_start = time.perf_counter()
        for _ in range(config.num_steps):
            obs, rewards, terminated, truncated, info = envs.recv()
            env_ids, dones = info["env_id"], terminated | truncated
            episodes.add(env_ids, rewards, dones)
            steps += trajectories.complete(
                env_ids, bootstrap_truncated(agent, rewards, truncated, info, config.gamma), dones
            )
            with torch.no_grad():
                actions, logprobs, _, values = (x.numpy() for x in agent.act(torch.as_tensor(obs)))
            envs.send(actions, env_ids)  # these envs step from now on, through the update too
            trajectories.start(env_ids, obs, actions, logprobs, values)
        rollout_seconds += time.perf_counter() - rollout_start
        iteration += 1

        # The first step of each env's next rollout was taken by this policy, and its value, the
        # GAE baseline there, is this critic's: one step per env a rollout, slightly stale.
        losses = ppo_update(agent, optimizer, trajectories.take_batch(config), config)
        if log_every and iteration % log_every == 0:
            print(
                f"  {steps:>8,} steps  mean return {ppo.mean_return(episodes.ended):6.1f}  {steps / (time.perf_counter() - start):6,.0f} steps/s  value loss {losses['value_loss']:.3f}",
                flush=True,
            )
    seconds = time.perf_counter() - start
    return TrainResult(ppo.mean_return(episodes.ended), episodes.count, steps, seconds, rollout_seconds)


def main() -> None:
    parser = ppo.common_args(__doc__, num_envs=8)
    parser.add_argument("--batch-size", type=int, default=None, help="envs per recv (default: num_envs / 2)")
    parser.add_argument("--compare", action="store_true", help="then train ppo.py's synchronous loop on as many envs")
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    batch_size = args.batch_size or args.num_envs // 2
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    # As many transitions per update as ppo.py's num_steps x num_envs, in recv batches of batch_size.
    config = dataclasses.replace(PPOConfig(), num_steps=PPOConfig().num_steps * args.num_envs // batch_size)

    name = f"envfarm send/recv x{args.num_envs}, batches of {batch_size}"
    print(f"{name}:", flush=True)
    envs = envfarm.make_vec(
        ppo.ENV_ID, args.num_envs, batch_size=batch_size, autoreset_mode=ppo.AUTORESET, inline_worker=args.inline_worker
    )
    try:
        result = train_send_recv(envs, args.total_timesteps, args.seed, args.time_budget, config)
    finally:
        envs.close()
    print(ppo.summary(name, result), flush=True)
    if not args.compare:
        return

    sync_name = f"envfarm step() x{args.num_envs}"
    print(f"{sync_name}:", flush=True)
    envs = ppo.make_envs("envfarm", args.num_envs, inline_worker=args.inline_worker)
    try:
        sync_result = ppo.train(envs, args.total_timesteps, args.seed, args.time_budget)
    finally:
        envs.close()
    print(ppo.summary(sync_name, sync_result), flush=True)
    print(f"{name} / {sync_name}: {result.steps_per_second / sync_result.steps_per_second:.2f}x the steps/s")


if __name__ == "__main__":  # envfarm may start worker processes by spawning, which re-imports this file
    main()
