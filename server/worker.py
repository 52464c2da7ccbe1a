"""A worker process: hosts K envs behind a ZeroMQ DEALER socket and serves one request at a time.

    worker = DEALER --connect--> trainer's ROUTER (local mode) or a broker (farm mode)

It says HELLO, builds its envs on CREATE, reports their spaces (the trainer builds no dummy env),
attaches to the trainer's shared memory on ATTACH when the probe succeeds, then answers RESET,
STEP, CALL, SET_ATTR and CLOSE. A malformed message gets an ERROR reply and the worker goes on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from typing import Any

import cloudpickle
import gymnasium as gym
import zmq
from gymnasium.vector import AutoresetMode

from envfarm.protocol import messages as m
from envfarm.protocol import spaces as space_codec
from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.packing import pack, unpack
from envfarm import channel as shm_channel
from envfarm.server import shared_memory
from envfarm.server.hosted_envs import HostedEnvs

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Makes the kernel kill this process when its parent dies, even mid-step in a hung env."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the trainer's close() and daemon flag remain
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def run_local_worker(endpoint: str, identity: bytes, parent_pid: int) -> None:
    """Entry point of a worker process started by a trainer on this host (a trusted link)."""
    # Ctrl-C reaches the whole process group; the trainer alone should see it, once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    Worker(endpoint, identity, trusted=True).serve()


class Worker:
    """Serves the requests that arrive on one DEALER socket until CLOSE."""

    def __init__(self, endpoint: str, identity: bytes, *, trusted: bool):
        self.trusted = trusted
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(endpoint)
        self.envs: HostedEnvs | None = None
        self.channel: shm_channel.WorkerEnd | None = None
        self.next_channel: shm_channel.WorkerEnd | None = None
        self.segments: list = []  # mappings of the trainer's shared memory, kept open

    def send(self, message: dict[str, Any]) -> None:
        try:
            frames = pack(message, allow_pickle=self.trusted)
        except TypeError as e:
            frames = pack(m.make(m.ERROR, message["rid"], error=ErrorInfo.from_exception(e).to_data()))
        if self.channel is None or not self.channel.send(frames):
            self.socket.send_multipart(frames, copy=False)

    def receive(self) -> dict[str, Any] | None:
        """The next request; None if the trainer replaced it while it was being read."""
        if self.channel is None:
            return unpack([f.buffer for f in self.socket.recv_multipart(copy=False)], allow_pickle=self.trusted)
        seq = self.channel.wait()
        frames = self.channel.requests.read()
        if frames is None:  # too large for the slot: it came on the socket
            return unpack([f.buffer for f in self.socket.recv_multipart(copy=False)], allow_pickle=self.trusted)
        try:
            message = unpack(frames, allow_pickle=self.trusted)
        except ProtocolError:
            if self.channel.requests.seq.value != seq:
                return None
            raise
        return message if self.channel.requests.seq.value == seq else None

    def serve(self) -> None:
        self.send(m.make(m.HELLO, 0, version=m.PROTOCOL_VERSION, pid=os.getpid(), host=socket.gethostname()))
        try:
            while True:
                rid = 0
                try:
                    message = self.receive()
                    if message is None:
                        continue
                    rid = m.check(message)["rid"]
                    reply = self.handle(message)
                except Exception as exc:  # errors are data: report and keep serving
                    self.send(m.make(m.ERROR, rid, error=ErrorInfo.from_exception(exc).to_data()))
                    continue
                self.send(reply)
                if message["kind"] == m.CLOSE:
                    return
                if self.next_channel is not None:  # ATTACHED went on the socket; the rest goes here
                    self.channel, self.next_channel = self.next_channel, None
        finally:
            self.socket.close(linger=1000)
            self.context.term()

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind, rid = message["kind"], message["rid"]
        if kind == m.CREATE:
            return m.make(m.CREATED, rid, **self.create(message))
        if kind == m.HEARTBEAT:
            return m.make(m.HEARTBEAT, rid)
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
            envs = [gym.make(source["env_id"], **source.get("kwargs", {})) for _ in message["envs"]]
        if len(envs) != len(message["envs"]):
            raise ProtocolError(f"CREATE names {len(message['envs'])} envs but brings {len(envs)} env_fns")
        self.envs = HostedEnvs(envs, message["envs"], AutoresetMode(message["autoreset_mode"]))
        return {
            "spaces": [[self._space(env.observation_space), self._space(env.action_space)] for env in envs],
            "metadata": dict(envs[0].metadata),
            "render_mode": envs[0].render_mode,
        }

    def _space(self, space: gym.Space) -> Any:
        try:
            return space_codec.encode_space(space)
        except space_codec.UnsupportedSpaceError:
            if self.trusted:  # travels pickled, as Gymnasium's AsyncVectorEnv sends it
                return space
            raise

    def attach(self, message: dict[str, Any]) -> dict[str, Any]:
        """Maps the trainer's observation buffer and message channel where the nonce probe succeeds."""
        if self.envs is None:
            raise ProtocolError("ATTACH before CREATE")
        reasons, obs_ok, channel_ok = [], False, False
        if message["obs"] is not None:
            first, count = self.envs.env_ids[0], len(self.envs.env_ids)
            segment, reason = shared_memory.map_segment(message["obs"])
            if segment is not None and self.envs.env_ids != list(range(first, first + count)):
                segment, reason = None, "this worker's envs are not a contiguous block of rows"
            if segment is not None:
                self.segments.append(segment)
                self.envs.use_shared_memory(shared_memory.batch_rows(segment, message["obs"]["layout"], first, count))
                obs_ok = True
            reasons.append(reason)
        if message["channel"] is not None and shm_channel.available():
            segment, reason = shared_memory.map_segment(message["channel"])
            if segment is not None:
                self.segments.append(segment)
                self.next_channel = shm_channel.WorkerEnd(memoryview(segment), message["channel"], message["channel"].get("spin", 0.0))
                channel_ok = True
            reasons.append(reason)
        return {"obs": obs_ok, "channel": channel_ok, "reason": "; ".join(r for r in reasons if r)}
