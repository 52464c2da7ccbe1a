"""PPO on CartPole-v1 in the style of CleanRL, with envfarm as the vector env.

    python3 examples/ppo.py                                   # envfarm, 8 envs
    python3 examples/ppo.py --vector both                     # envfarm, then SyncVectorEnv: steps/s of each
    python3 examples/ppo.py --torch-threads 1 --time-budget 60
    python3 examples/ppo.py --broker tcp://127.0.0.1:5555     # envs leased from a farm (docker-compose up)

Read top to bottom: settings, the agent, GAE, the PPO update, the training loop, the command line.
examples/ppo_send_recv.py imports the agent, GAE and the update from here.

envfarm is a drop-in for gymnasium's AsyncVectorEnv and steps exactly like SyncVectorEnv, so with
the same seed both vector envs train the same agent, episode for episode: only steps/s differ
(unless --time-budget ends a run first: the learning rate then anneals by the clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from torch import nn
from torch.distributions import Categorical

import envfarm

ENV_ID = "CartPole-v1"
# SAME_STEP: when an episode ends, step() already returns the next episode's first observation
# (the last one is in info["final_obs"]), so every stored transition is a real one.
AUTORESET = AutoresetMode.SAME_STEP
REPORT_EPISODES = 20  # the final score: mean return of this many last episodes


@dataclasses.dataclass
class PPOConfig:
    """CleanRL's PPO loop, tuned for CartPole on 8 envs x 128 steps: learning rate 1e-3 annealed to 0,
    10 epochs, GAE lambda 0.8, no entropy bonus. Seeds 1-8 all reached a return of 500 in 100k
    steps and passed 150 by 20k. PPO on CartPole still dips now and then: runs of 75k-90k steps
    ended below 475 for 3 of 32 seeds (313-458). Annealing matters: at a constant 1e-3, a run
    reached 500, then fell to ~130."""

    num_steps: int = 128  # steps per env in a rollout
    learning_rate: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.8
    num_minibatches: int = 4
    update_epochs: int = 10
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclasses.dataclass
class TrainResult:
    mean_return: float  # over the last REPORT_EPISODES episodes (nan if none ended)
    episodes: int
    steps: int  # env steps, summed over envs
    seconds: float  # the training loop's wall time: rollouts and updates, not building the envs
    rollout_seconds: float  # of which stepping the envs and running the policy

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


# ----------------------------------------------------------------------------- the agent


def layer(in_features: int, out_features: int, std: float = np.sqrt(2)) -> nn.Linear:
    """A linear layer with orthogonal weights, as in CleanRL (it trains faster than torch's default)."""
    linear = nn.Linear(in_features, out_features)
    nn.init.orthogonal_(linear.weight, std)
    nn.init.constant_(linear.bias, 0.0)
    return linear


class Agent(nn.Module):
    """Separate actor and critic MLPs, two hidden layers of 64 tanh units each."""

    def __init__(self, obs_size: int, num_actions: int):
        super().__init__()
        self.critic = nn.Sequential(layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 1, std=1.0))
        # A small last layer makes the first policy nearly uniform.
        self.actor = nn.Sequential(
            layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, num_actions, std=0.01)
        )

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def act(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action, its log-probability, the policy's entropy, the state's value); samples an action if none is given."""
        dist = Categorical(
            logits=self.actor(obs), validate_args=False
        )  # checking the logits every step costs ~5% of the loop
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(obs)


@torch.no_grad()
def bootstrap_truncated(
    agent: Agent, rewards: np.ndarray, truncated: np.ndarray, info: dict[str, Any], gamma: float
) -> np.ndarray:
    """Adds gamma * V(last observation) to the reward of episodes cut off by the time limit.

    A truncated episode did not end: its future is estimated rather than taken as zero, so
    the value of CartPole's states does not depend on a clock the agent cannot see. An env that
    envfarm restarted after losing its worker (info["envfarm_restarted"]) is truncated with no
    last observation: nothing is added for it."""
    none = np.zeros_like(truncated)
    cut = truncated & info.get("_final_obs", none) & ~info.get("_envfarm_restarted", none)
    if not cut.any():
        return rewards
    last_obs = torch.as_tensor(np.stack(info["final_obs"][cut]))
    rewards = rewards.copy()
    rewards[cut] += gamma * agent.value(last_obs).numpy()
    return rewards


# ----------------------------------------------------------------------------- learning


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, next_value: np.ndarray | float, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over time (the first axis); returns (advantages, returns).

    Step t's transition is (obs_t, action_t, rewards[t], dones[t]): dones[t] means the episode
    ended at step t, so nothing after it counts for it. `next_value` is the value of the
    observation after the last step. Any trailing axes (one per env) are computed independently.
    In numpy rather than torch: this loop is Python, and a numpy operation costs a tenth of a torch one.
    """
    advantages = np.zeros_like(rewards)
    last_advantage = np.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        following_value = next_value if t == len(rewards) - 1 else values[t + 1]
        alive = 1.0 - dones[t]
        delta = rewards[t] + gamma * following_value * alive - values[t]
        last_advantage = delta + gamma * lam * alive * last_advantage
        advantages[t] = last_advantage
    return advantages, advantages + values


def flat_batch(**columns: np.ndarray) -> dict[str, torch.Tensor]:
    """Rollout arrays of shape (steps, envs, ...) as tensors of one row per transition."""
    return {name: torch.as_tensor(column.reshape(-1, *column.shape[2:])) for name, column in columns.items()}


def ppo_update(
    agent: Agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], config: PPOConfig
) -> dict[str, float]:
    """Clipped-objective PPO epochs over one rollout, given flat tensors (one row per transition):
    obs, actions, logprobs, advantages, returns. Returns the last minibatch's losses."""
    size = len(batch["obs"])
    minibatch_size = size // config.num_minibatches
    for _ in range(config.update_epochs):
        order = torch.randperm(size)
        for start in range(0, size - minibatch_size + 1, minibatch_size):
            idx = order[start : start + minibatch_size]
            _, logprob, entropy, value = agent.act(batch["obs"][idx], batch["actions"][idx])
            ratio = (logprob - batch["logprobs"][idx]).exp()
            advantages = batch["advantages"][idx]
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = torch.max(
                -advantages * ratio, -advantages * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
            ).mean()
            value_loss = 0.5 * ((value - batch["returns"][idx]) ** 2).mean()
            loss = policy_loss - config.ent_coef * entropy.mean() + config.vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
            optimizer.step()
    return {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.mean().item()}


def anneal(optimizer: torch.optim.Optimizer, config: PPOConfig, progress: float) -> None:
    """Learning rate falls linearly to zero as training nears its end (steps or time, whichever comes first)."""
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * max(0.0, 1.0 - progress)


# ----------------------------------------------------------------------------- training


def make_envs(vector: str, num_envs: int, broker: str | None = None, **envfarm_kwargs: Any) -> VectorEnv:
    """CartPole-v1 x num_envs in SyncVectorEnv or envfarm (a farm's workers if `broker` is given),
    recording episode returns at the vector level."""
    if vector == "sync":
        envs = gym.make_vec(ENV_ID, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AUTORESET})
    elif broker is not None:
        # A farm worker may be lost (a host rebooted): its envs are rebuilt on a spare one and reported truncated.
        envs = envfarm.make_vec(
            ENV_ID, num_envs, autoreset_mode=AUTORESET, broker=broker, on_failure="restart", **envfarm_kwargs
        )
    else:
        envs = envfarm.make_vec(ENV_ID, num_envs, autoreset_mode=AUTORESET, **envfarm_kwargs)
    return RecordEpisodeStatistics(envs, buffer_length=REPORT_EPISODES)


def train(
    envs: RecordEpisodeStatistics,
    total_timesteps: int,
    seed: int,
    time_budget: float | None = None,
    config: PPOConfig = PPOConfig(),
    log_every: int = 10,
) -> TrainResult:
    """Trains a fresh agent for `total_timesteps` env steps or `time_budget` seconds, whichever ends first."""
    torch.manual_seed(seed)
    num_envs, num_steps = envs.num_envs, config.num_steps
    obs_size = int(np.prod(envs.single_observation_space.shape))
    agent = Agent(obs_size, int(envs.single_action_space.n))
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)

    # The rollout, one row per step: (num_steps, num_envs, ...).
    obs = np.zeros((num_steps, num_envs, obs_size), np.float32)
    actions = np.zeros((num_steps, num_envs), np.int64)
    logprobs, rewards, dones, values = (np.zeros((num_steps, num_envs), np.float32) for _ in range(4))

    next_obs, _ = envs.reset(seed=seed)
    steps, iteration, rollout_seconds = 0, 0, 0.0
    start = time.perf_counter()
    while steps < total_timesteps and (time_budget is None or time.perf_counter() - start < time_budget):
        elapsed = time.perf_counter() - start
        anneal(optimizer, config, max(steps / total_timesteps, elapsed / time_budget if time_budget else 0.0))
        rollout_start = time.perf_counter()
        for t in range(num_steps):
            obs[t] = next_obs
            with torch.no_grad():
                action, logprob, _, value = agent.act(torch.as_tensor(next_obs))
            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            actions[t], logprobs[t], values[t] = action.numpy(), logprob.numpy(), value.numpy()
            rewards[t] = bootstrap_truncated(agent, reward, truncated, info, config.gamma)
            dones[t] = terminated | truncated
        rollout_seconds += time.perf_counter() - rollout_start
        steps += num_steps * num_envs
        iteration += 1

        with torch.no_grad():
            next_value = agent.value(torch.as_tensor(next_obs)).numpy()
        advantages, returns = compute_gae(rewards, values, dones, next_value, config.gamma, config.gae_lambda)
        batch = flat_batch(obs=obs, actions=actions, logprobs=logprobs, advantages=advantages, returns=returns)
        losses = ppo_update(agent, optimizer, batch, config)
        if log_every and iteration % log_every == 0:
            print(
                f"  {steps:>8,} steps  mean return {mean_return(envs.return_queue):6.1f}  {steps / (time.perf_counter() - start):6,.0f} steps/s  value loss {losses['value_loss']:.3f}",
                flush=True,
            )
    seconds = time.perf_counter() - start
    return TrainResult(mean_return(envs.return_queue), envs.episode_count, steps, seconds, rollout_seconds)


def mean_return(returns: Iterable[float]) -> float:
    returns = list(returns)[-REPORT_EPISODES:]
    return float(np.mean(returns)) if returns else float("nan")


def summary(name: str, result: TrainResult) -> str:
    """The line the tests and docs/measure read: keep its wording."""
    return (
        f"{name}: mean return of the last {REPORT_EPISODES} episodes {result.mean_return:.1f} | {result.episodes} episodes, "
        f"{result.steps:,} steps in {result.seconds:.1f} s | {result.steps_per_second:,.0f} steps/s "
        f"({result.rollout_seconds / result.seconds:.0%} of the time in rollouts)"
    )


# ----------------------------------------------------------------------------- command line


def common_args(description: str | None, num_envs: int) -> argparse.ArgumentParser:
    """The options both examples take."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-timesteps", type=int, default=100_000, help="env steps, all envs together")
    parser.add_argument("--num-envs", type=int, default=num_envs)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads in this process (default: torch's own, one per core)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop training after this many seconds (each run, when comparing)",
    )
    parser.add_argument(
        "--inline-worker",
        action="store_true",
        help="envfarm steps one block of envs in this process (faster for cheap envs)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_args(__doc__, num_envs=8)
    parser.add_argument(
        "--vector",
        choices=["envfarm", "sync", "both"],
        default="envfarm",
        help="both: envfarm then SyncVectorEnv, same seed",
    )
    parser.add_argument(
        "--broker", default=None, help="lease the envs from this farm, e.g. tcp://127.0.0.1:5555 (the compose farm)"
    )
    args = parser.parse_args(argv)
    if args.broker and args.vector == "sync":
        parser.error("--broker needs --vector envfarm or both: SyncVectorEnv steps its envs in this process")
    if args.broker and args.inline_worker:
        parser.error("--broker and --inline-worker exclude each other: a farm's envs all live on its workers")
    return args


def main() -> None:
    args = parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    envfarm_kwargs = {"inline_worker": True} if args.inline_worker else {}
    results: dict[str, TrainResult] = {}
    for vector in ["envfarm", "sync"] if args.vector == "both" else [args.vector]:
        envs = make_envs(vector, args.num_envs, args.broker if vector == "envfarm" else None, **envfarm_kwargs)
        name = f"{vector} x{args.num_envs}" + (" (farm)" if args.broker and vector == "envfarm" else "")
        print(f"{name}:", flush=True)
        try:
            results[name] = train(envs, args.total_timesteps, args.seed, args.time_budget)
        finally:
            envs.close()
        print(summary(name, results[name]), flush=True)
    if len(results) == 2:
        (farm_name, farm), (sync_name, sync) = results.items()
        print(f"{farm_name} / {sync_name}: {farm.steps_per_second / sync.steps_per_second:.2f}x the steps/s")


if __name__ == "__main__":  # envfarm may start worker processes by spawning, which re-imports this file
    main()
