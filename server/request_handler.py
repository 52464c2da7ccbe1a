"""Answering requests: what a worker does with each message, independent of how it arrives.

A RequestHandler hosts the envs (HostedEnvs) once CREATE arrives, attaches to the trainer's shared
memory on ATTACH, and turns every other request into its reply. Any exception becomes an ERROR
reply: the worker reports it and goes on serving.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import cloudpickle
import gymnasium as gym
from gymnasium.vector import AutoresetMode

from envfarm.protocol import messages as m
from envfarm.protocol import spaces as space_codec
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.server.hosted_envs import HostedEnvs
from envfarm.transport import channel as shm_channel
from envfarm.transport import segments


class RequestHandler:
    """Turns requests into replies for the envs of one worker."""

    def __init__(self, *, trusted: bool, allow: Sequence[str] | None = None):
        """`allow`: shell-style patterns of the env ids this worker builds for an untrusted peer
        (default: any id in Gymnasium's registry when the worker started)."""
        self.trusted = trusted
        self.allow = list(allow) if allow is not None else None
        self.envs: HostedEnvs | None = None
        self.channel: shm_channel.WorkerEnd | None = None  # set by ATTACH when the channel probe succeeds
        self.batch_segment = None  # the mapping of the trainer's batch buffer this worker writes into
        self.channel_segment = None
        self.closed = False

    def respond(self, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one decoded message; an ERROR reply if it is malformed or fails."""
        rid = message.get("rid") if type(message.get("rid")) is int else 0
        try:
            return self.handle(m.check(message))
        except Exception as exc:
            return m.make(m.ERROR, rid, error=ErrorInfo.from_exception(exc).to_data())

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind, rid = message["kind"], message["rid"]
        if kind == m.CREATE:
            return m.make(m.CREATED, rid, **self.create(message))
        if kind == m.ATTACH:
            return m.make(m.ATTACHED, rid, **self.attach(message))
        envs = self.envs
        if envs is None:
            raise ProtocolError(f"{kind} before CREATE: this worker hosts no envs yet")
        if kind == m.STEP:
            return m.make(m.RESULT, rid, **envs.step(message["envs"], message["actions"]))
        if kind == m.RESET:
            return m.make(m.RESULT, rid, **envs.reset(message["envs"], message["seeds"], message["options"]))
        if kind == m.CALL:
            return m.make(m.RESULT, rid, **envs.call(message["name"], message["args"], message["kwargs"]))
        if kind == m.SET_ATTR:
            return m.make(m.RESULT, rid, **envs.set_attr(message["name"], message["values"]))
        if kind == m.CLOSE:
            self.closed = True
            return m.make(m.RESULT, rid, **envs.close())
        raise ProtocolError(f"a worker does not serve {kind} messages")

    def create(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.envs is not None:
            raise ProtocolError("CREATE sent twice: this worker already hosts envs")
        source = message["source"]
        if "env_fns" in source:
            if not self.trusted:
                raise ProtocolError("refused pickled env_fns: this worker was not started in trusted mode")
            env_fns = cloudpickle.loads(source["env_fns"])
            envs = [env_fn() for env_fn in env_fns]
        else:
            env_id = source.get("env_id")
            self._check_allowed(env_id)
            envs = [gym.make(env_id, **source.get("kwargs", {})) for _ in message["envs"]]
        if len(envs) != len(message["envs"]):
            raise ProtocolError(f"CREATE names {len(message['envs'])} envs but brings {len(envs)} env_fns")
        self.envs = HostedEnvs(envs, message["envs"], AutoresetMode(message["autoreset_mode"]))
        return {
            "spaces": [[self._space(env.observation_space), self._space(env.action_space)] for env in envs],
            "metadata": dict(envs[0].metadata),
            "render_mode": envs[0].render_mode,
        }

    def _check_allowed(self, env_id: Any) -> None:
        if not isinstance(env_id, str):
            raise ProtocolError(f"an env id must be a string, got {env_id!r:.80}")
        if self.trusted:
            return
        if ":" in env_id:
            raise ProtocolError(
                f"refused env id {env_id!r:.80}: 'module:Env' ids import code, which needs a trusted link"
            )
        if self.allow is None:
            if env_id not in gym.registry:
                raise ProtocolError(f"env id {env_id!r:.80} is not registered on this worker")
        elif not any(fnmatch.fnmatchcase(env_id, pattern) for pattern in self.allow):
            raise ProtocolError(f"env id {env_id!r:.80} is not allowed on this worker (--allow {','.join(self.allow)})")

    def _space(self, space: gym.Space) -> Any:
        try:
            return space_codec.encode_space(space)
        except space_codec.UnsupportedSpaceError:
            if self.trusted:  # travels pickled, as Gymnasium's AsyncVectorEnv sends it
                return space
            raise

    def attach(self, message: dict[str, Any]) -> dict[str, Any]:
        """Maps the trainer's observation buffer and message channel where the nonce probe succeeds.

        A trainer may ATTACH again with a new batch buffer (it moved its buffer away from a worker
        it gave up for lost): the old mapping is dropped, and where the new one cannot be mapped,
        results travel in the replies again."""
        if self.envs is None:
            raise ProtocolError("ATTACH before CREATE")
        reasons, obs_ok, channel_ok = [], False, False
        if message["obs"] is not None:
            first, count = self.envs.env_ids[0], len(self.envs.env_ids)
            segment, reason = segments.attach(message["obs"])
            if segment is not None and self.envs.env_ids != list(range(first, first + count)):
                segment, reason = None, "this worker's envs are not a contiguous block of rows"
            if segment is not None:
                self.envs.use_shared_memory(space_codec.batch_rows(segment, message["obs"]["layout"], first, count))
                obs_ok = True
            else:
                self.envs.use_private_memory()
            self.batch_segment = segment  # the old mapping goes with its last view
            reasons.append(reason)
        if message["channel"] is not None and shm_channel.available():
            segment, reason = segments.attach(message["channel"])
            if segment is not None:
                self.channel_segment = segment
                self.channel = shm_channel.WorkerEnd(
                    memoryview(segment), message["channel"], message["channel"].get("spin", 0.0)
                )
                channel_ok = True
            reasons.append(reason)
        return {"obs": obs_ok, "channel": channel_ok, "reason": "; ".join(r for r in reasons if r)}
