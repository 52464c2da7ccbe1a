"""A compliance suite for envfarm workers, in the spirit of dm_env_rpc's: any implementation of the
worker side of docs/protocol.md passes it, whatever its language or process model.

Subclass `WorkerCompliance` in a test module and give it a `peer` fixture that starts your worker
connected to a ROUTER socket (`Peer.endpoint`) under `Peer.identity`, and yields that Peer;
tests/compliance/test_envfarm_worker.py does so for envfarm's own. The suite plays the trainer,
byte for byte through `protocol/`, on a plain socket (no shared memory, no channel: the
protocol's common core), and checks what a trainer relies on:

- HELLO first, with the protocol version; every reply carries its request's rid;
- CREATE reports each env's spaces; RESET and STEP give exactly what Gymnasium's SyncVectorEnv
  gives for the same seeds and actions, in every autoreset mode, infos batched as Gymnasium does;
- an env's exception is data for that env, and the others' results are kept;
- a malformed or unknown request is an ERROR reply, and the worker serves on;
- CLOSE is answered, and ends the service.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import zmq
from gymnasium.vector import AutoresetMode

from envfarm.protocol import infos as info_codec
from envfarm.protocol import messages as m
from envfarm.protocol import spaces as space_codec
from envfarm.protocol.packing import pack, unpack

TIMEOUT_MS = 30_000  # a worker building envs may take seconds; none of these calls takes more


@dataclasses.dataclass
class Peer:
    """The trainer's end: a ROUTER that the worker under test connects to."""

    socket: zmq.Socket
    endpoint: str
    identity: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(16))
    rid: int = 0

    @classmethod
    def bind(cls, context: zmq.Context, endpoint: str = "tcp://127.0.0.1:*") -> Peer:
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(endpoint)
        return cls(socket, socket.getsockopt_string(zmq.LAST_ENDPOINT))

    def receive(self) -> dict[str, Any]:
        if not self.socket.poll(TIMEOUT_MS):
            pytest.fail(f"the worker sent nothing within {TIMEOUT_MS / 1000:g} s")
        identity, *frames = self.socket.recv_multipart()
        assert identity == self.identity, "a message under another identity than the worker's"
        return m.check(unpack(frames))

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart([self.identity, *frames])

    def ask(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Sends a request; returns its reply, which must carry its rid."""
        self.rid += 1
        self.send_frames(pack(m.make(kind, self.rid, **fields)))
        reply = self.receive()
        assert reply["rid"] == self.rid, f"a reply to request {self.rid} carries rid {reply['rid']}"
        return reply


def _sync(env_id: str, count: int, mode: AutoresetMode) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * count, autoreset_mode=mode)


def _obs(reply: dict[str, Any], space: gym.Space) -> Any:
    return space_codec.join(space, iter(reply["obs"]))


def _assert_same_infos(actual: Any, expected: Any, where: str) -> None:
    """Gymnasium's batched infos, compared key by key down to each env's value."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), (
            f"{where}: infos {actual!r:.200} != {expected!r:.200}"
        )
        for key in expected:
            _assert_same_infos(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, np.ndarray) and expected.dtype == object:
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            if e is None:
                assert a is None, f"{where}[{i}]"
            else:
                _assert_same_infos(a, e, f"{where}[{i}]")
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=where)


class WorkerCompliance:
    """The suite; a subclass provides the `peer` fixture (a connected worker, HELLO not yet read)."""

    ENV_ID = "CartPole-v1"
    COUNT = 3

    @pytest.fixture
    def hello(self, peer: Peer) -> dict[str, Any]:
        return peer.receive()

    def create(self, peer: Peer, mode: AutoresetMode = AutoresetMode.NEXT_STEP) -> list[list[Any]]:
        reply = peer.ask(
            m.CREATE, envs=list(range(self.COUNT)), source={"env_id": self.ENV_ID}, autoreset_mode=mode.value
        )
        assert reply["kind"] == m.CREATED, reply
        return reply["spaces"]

    def test_it_says_hello_first_with_the_protocol_version(self, peer: Peer, hello: dict[str, Any]) -> None:
        assert hello["kind"] == m.HELLO and hello["version"] == m.PROTOCOL_VERSION and hello["rid"] == 0
        assert isinstance(hello["pid"], int) and isinstance(hello["host"], str)

    def test_create_reports_every_envs_spaces(self, peer: Peer, hello: dict[str, Any]) -> None:
        spaces = self.create(peer)
        reference = gym.make(self.ENV_ID)
        assert len(spaces) == self.COUNT
        for observation_space, action_space in spaces:
            assert space_codec.decode_space(observation_space) == reference.observation_space
            assert space_codec.decode_space(action_space) == reference.action_space

    @pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda mode: mode.value)
    def test_reset_and_step_give_what_sync_vector_env_gives(
        self, peer: Peer, hello: dict[str, Any], mode: AutoresetMode
    ) -> None:
        [[observation_space, action_space], *_] = self.create(peer, mode)
        observation_space = space_codec.decode_space(observation_space)
        action_space = space_codec.decode_space(action_space)
        sync = _sync(self.ENV_ID, self.COUNT, mode)
        envs = list(range(self.COUNT))
        expected_obs, expected_info = sync.reset(seed=[10 + i for i in envs])
        reply = peer.ask(m.RESET, envs=envs, seeds=[10 + i for i in envs], options=None)
        assert reply["kind"] == m.RESULT and reply["errors"] == []
        np.testing.assert_array_equal(_obs(reply, observation_space), expected_obs)
        actions = gym.vector.utils.batch_space(action_space, self.COUNT)
        actions.seed(0)
        ended = np.zeros(self.COUNT, np.bool_)
        for step in range(200):  # CartPole's episodes end within it, so every autoreset path runs
            action = actions.sample()
            if mode == AutoresetMode.DISABLED and ended.any():
                reset_envs = [int(i) for i in np.flatnonzero(ended)]
                expected_obs, expected_info = sync.reset(options={"reset_mask": ended})
                reply = peer.ask(m.RESET, envs=reset_envs, seeds=[None] * len(reset_envs), options=None)
                assert reply["errors"] == []
            expected = sync.step(action)
            reply = peer.ask(m.STEP, envs=envs, actions=space_codec.split(action_space, action))
            assert reply["kind"] == m.RESULT and reply["errors"] == [], f"step {step}: {reply}"
            np.testing.assert_array_equal(_obs(reply, observation_space), expected[0], err_msg=f"step {step}")
            np.testing.assert_array_equal(reply["rewards"], expected[1])
            np.testing.assert_array_equal(reply["terminated"], expected[2])
            np.testing.assert_array_equal(reply["truncated"], expected[3])
            _assert_same_infos(info_codec.add_block({}, reply["infos"], envs, self.COUNT), expected[4], f"step {step}")
            ended = expected[2] | expected[3]
        sync.close()

    def test_an_envs_exception_is_data_for_that_env_and_the_others_step(
        self, peer: Peer, hello: dict[str, Any]
    ) -> None:
        self.create(peer)
        reply = peer.ask(m.RESET, envs=[0, 1], seeds=[0, 1], options=None)  # env 2 is never reset
        assert reply["errors"] == []
        reply = peer.ask(m.STEP, envs=[0, 1, 2], actions=[np.zeros(3, np.int64)])
        assert reply["kind"] == m.RESULT
        assert [env for env, _ in reply["errors"]] == [2], reply["errors"]
        error = reply["errors"][0][1]
        assert {"type", "message"} <= set(error) and "reset" in error["message"].lower()
        assert np.all(np.isfinite(_obs(reply, gym.make(self.ENV_ID).observation_space)[:2]))

    def test_a_malformed_request_is_an_error_and_the_worker_serves_on(self, peer: Peer, hello: dict[str, Any]) -> None:
        peer.send_frames([b"\x93not a map"])
        assert peer.receive()["kind"] == m.ERROR
        peer.send_frames(pack({"kind": "teleport", "rid": 77}))
        reply = peer.receive()
        assert reply["kind"] == m.ERROR and "teleport" in reply["error"]["message"]
        self.create(peer)  # still serving

    def test_a_request_before_create_is_an_error_naming_it(self, peer: Peer, hello: dict[str, Any]) -> None:
        reply = peer.ask(m.STEP, envs=[0], actions=[np.zeros(1, np.int64)])
        assert reply["kind"] == m.ERROR and "CREATE" in reply["error"]["message"]

    def test_close_is_answered_and_ends_the_service(self, peer: Peer, hello: dict[str, Any]) -> None:
        self.create(peer)
        reply = peer.ask(m.CLOSE)
        assert reply["kind"] == m.RESULT
        peer.rid += 1
        peer.send_frames(pack(m.make(m.CALL, peer.rid, name="spec", args=[], kwargs={})))
        assert not peer.socket.poll(1000), "a worker answered after CLOSE"
