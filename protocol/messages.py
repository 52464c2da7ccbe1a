"""The message set: what a trainer (or broker) and a worker say to each other.

Every message is a map with "kind" and "rid" (request id). A reply carries the rid of its
request, so a late reply to an abandoned request is recognised and dropped. The conversation:

    worker  -> HELLO   {version, pid, host}                 once, on connecting
    trainer -> CREATE  {envs, source, autoreset_mode}       -> CREATED {spaces, metadata, render_mode}
    trainer -> ATTACH  {obs, channel}                       -> ATTACHED {obs, channel, reason}
    trainer -> RESET   {envs, seeds, options}               -> RESULT {envs, obs, infos, errors}
    trainer -> STEP    {envs, actions}                      -> RESULT {envs, rewards, terminated, truncated, obs, infos, errors}
    trainer -> CALL    {name, args, kwargs}                 -> RESULT {values, errors}
    trainer -> SET_ATTR {name, values}                      -> RESULT {errors}
    trainer -> CLOSE   {}                                   -> RESULT {}
    worker  -> ERROR   {error}                              the request as a whole failed

In farm mode a broker leases workers to trainers and introduces them; it is not on the data path:

    worker  -> HELLO   {version, pid, host, slots, allow, lease, lessee, trainer_key, steps}    every HEARTBEAT_INTERVAL
    trainer -> LEASE   {envs, env_id, endpoint, server_key, add?}   -> LEASED {workers: [[identity, slots, host, pid, key], ...], dead_after}
    broker  -> JOIN    {endpoint, server_key, lease, trainer, trainer_key}   the worker connects to the trainer's endpoint
    trainer -> RELEASE {}                                   -> RESULT {}
    trainer -> STATUS  {}                                   -> RESULT {workers: [{...}], trainers, you}   (also an admin's key)
    broker  -> CLOSE   {}                                   the lease is over

A farm worker's HELLO to the broker doubles as its heartbeat: `slots` (envs it hosts at most),
`allow` (the env id patterns it builds, or None: any registered id), `lease` and `lessee` (the
lease it serves, so that a restarted broker learns the farm's state from the workers), `steps`
(env steps served). With CurveZMQ, the broker binds each worker's and trainer's identity to the
key it proved, and hands a trainer the keys of the workers it leases (LEASED `key`). On JOIN
it connects a second socket to the trainer, says HELLO there, and from then on the trainer talks
to it exactly as to a local worker. A thread of its own sends a heartbeat every
HEARTBEAT_INTERVAL, stepping or not, from a second socket whose identity is the worker's plus
HEARTBEAT_SUFFIX, so a long step is never taken for silence. A trainer waiting on a worker sends
probes on the data socket (`trainer_probe`: how many requests it sent there before the probe);
the worker's heartbeat says how many requests it read and the last probe it read
(`worker_heartbeat`). A probe travels behind the requests sent before it on the same connection,
so a worker that read a probe but fewer requests than the probe counts has provably lost one.

"envs" are global env indices; per-env errors travel as [[env index, error data], ...], so one
failing env never hides the results of the others. `infos` come batched by key where the block's
envs agree (see protocol/infos.py). The field types are checked by `check`. The
broker, which any peer that reaches its port can talk to, also checks every field it reads against
`CONTROL_BOUNDS` (`check_control`): types, lengths, counts and ranges, so that one message costs it
a bounded amount of work and memory whatever it holds. With Curve, JOIN's `trainer_key` is the key
the trainer proved to the broker; a worker reports it in HELLO with its lease, so that a restarted
broker binds the trainer's identity to that key again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envfarm.protocol.errors import ProtocolError

PROTOCOL_VERSION = 3  # 3: infos batched by key (protocol/infos.py), step records on the channel
WORKER_PREFIX, TRAINER_PREFIX = b"W", b"T"
HEARTBEAT_FRAME = b""  # a trainer's heartbeat to the broker
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_SUFFIX = b"/hb"  # a heartbeat socket's identity: its owner's (a trainer's to the broker, a farm worker's to its trainer) plus this

HELLO = "hello"
CREATE = "create"
CREATED = "created"
ATTACH = "attach"
ATTACHED = "attached"
RESET = "reset"
STEP = "step"
CALL = "call"
SET_ATTR = "set_attr"
CLOSE = "close"
RESULT = "result"
ERROR = "error"
LEASE = "lease"
LEASED = "leased"
RELEASE = "release"
JOIN = "join"
STATUS = "status"

_list = (list, tuple)
_opt_dict = (dict, type(None))
FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"version": int, "pid": int, "host": str},
    CREATE: {"envs": _list, "source": dict, "autoreset_mode": str},
    CREATED: {"spaces": _list, "metadata": dict, "render_mode": (str, type(None))},
    ATTACH: {"obs": _opt_dict, "channel": _opt_dict},
    ATTACHED: {"obs": bool, "channel": bool, "reason": str},
    RESET: {"envs": _list, "seeds": _list, "options": _opt_dict},
    STEP: {"envs": _list, "actions": _list},
    CALL: {"name": str, "args": _list, "kwargs": dict},
    SET_ATTR: {"name": str, "values": _list},
    CLOSE: {},
    RESULT: {"errors": _list},
    ERROR: {"error": dict},
    LEASE: {"envs": int, "env_id": str, "endpoint": str, "server_key": (str, type(None))},
    LEASED: {"workers": _list, "dead_after": (int, float)},
    # trainer_key: None from a broker older than it, or without Curve
    JOIN: {
        "endpoint": str,
        "server_key": (str, type(None)),
        "lease": str,
        "trainer": bytes,
        "trainer_key": (str, type(None)),
    },
    RELEASE: {},
    STATUS: {},
}


# Liveness frames on a farm data link: one frame each, whose first byte is a positive msgpack
# fixint, so that no message header (always a msgpack map) can be taken for one.
_PROBE, _HEARTBEAT = b"P", b"H"


def trainer_probe(requests_sent: int, awaited: int) -> bytes:
    """A trainer's probe of a worker's data connection: how many requests it sent there before it,
    and the rid of the reply it awaits (a worker that already sent that reply sends it again:
    a reset connection may have lost it on the way back)."""
    return _PROBE + requests_sent.to_bytes(8, "little") + awaited.to_bytes(8, "little", signed=True)


def read_trainer_probe(frame: bytes) -> tuple[int, int] | None:
    """(requests sent before it, awaited rid) from a trainer's probe; None if the frame is not one."""
    if len(frame) != 17 or frame[:1] != _PROBE:
        return None
    return int.from_bytes(frame[1:9], "little"), int.from_bytes(frame[9:], "little", signed=True)


def worker_heartbeat(link: int, requests_read: int, probe_seen: int) -> bytes:
    """A farm worker's heartbeat to its trainer: the token of its data connection (`link`, also in
    its HELLO there), the requests it has read from that connection, and the count carried by
    the last probe it read there (0: none yet)."""
    return _HEARTBEAT + b"".join(n.to_bytes(8, "little") for n in (link, requests_read, probe_seen))


def read_worker_heartbeat(frame: bytes) -> tuple[int, int, int] | None:
    """(link, requests read, last probe's count) from a worker's heartbeat; None if the frame is not one."""
    if len(frame) != 25 or frame[:1] != _HEARTBEAT:
        return None
    return (
        int.from_bytes(frame[1:9], "little"),
        int.from_bytes(frame[9:17], "little"),
        int.from_bytes(frame[17:], "little"),
    )


# Step records, on a same-host channel only: when a worker reads its actions from the shared batch
# buffer and writes its results there, a step of all its envs needs nothing but the rid each way,
# and a result with no infos and no errors nothing but the rid back. One 9-byte frame, whose
# first byte is a positive msgpack fixint like the liveness frames'. Saves the msgpack encoding,
# decoding and checking of two messages per worker and step (about 10 us on the 2-CPU VM).
_STEP_RECORD, _RESULT_RECORD = b"s", b"r"


def step_record(rid: int) -> bytes:
    """A STEP of every env the worker hosts, actions in the shared batch buffer."""
    return _STEP_RECORD + rid.to_bytes(8, "little", signed=True)


def result_record(rid: int) -> bytes:
    """The RESULT of a step record whose results are all in the shared batch buffer, with empty
    infos and no errors."""
    return _RESULT_RECORD + rid.to_bytes(8, "little", signed=True)


def read_step_record(frames: list) -> int | None:
    """The rid of a step record; None if the frames are not one."""
    return _read_record(frames, _STEP_RECORD)


def read_result_record(frames: list) -> dict[str, Any] | None:
    """The RESULT a result record stands for; None if the frames are not one."""
    rid = _read_record(frames, _RESULT_RECORD)
    if rid is None:
        return None
    return make(RESULT, rid, rewards=None, terminated=None, truncated=None, obs=None, infos={}, errors=[])


def _read_record(frames: list, tag: bytes) -> int | None:
    if len(frames) != 1 or len(frames[0]) != 9 or frames[0][:1] != tag:
        return None
    return int.from_bytes(frames[0][1:], "little", signed=True)


def make(kind: str, rid: int, **fields: Any) -> dict[str, Any]:
    """Builds a message of a known kind."""
    return {"kind": kind, "rid": rid, **fields}


def check(message: dict[str, Any]) -> dict[str, Any]:
    """Returns the message if its kind is known and its fields have the right types, else raises ProtocolError."""
    kind, rid = message.get("kind"), message.get("rid")
    fields = FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message kind {describe(kind)}; known kinds: {', '.join(FIELDS)}")
    if type(rid) is not int:
        raise ProtocolError(f"{kind} message has no integer 'rid'")
    for name, types in fields.items():
        value = message.get(name)
        if not isinstance(value, types) or (types is int and type(value) is bool):
            raise ProtocolError(f"{kind} message field {name!r} must be {_names(types)}, got {type(value).__name__}")
    if kind == HELLO and message["version"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks envfarm protocol version {describe(message['version'])}, this side speaks {PROTOCOL_VERSION}"
        )
    return message


def describe(value: Any) -> str:
    """A short text for a value a peer sent, safe whatever the value: repr() of a nested container
    recurses once per level (a list nested 1000 deep raises RecursionError) and costs its whole
    size, so containers are named by type only, and strings and numbers are cut."""
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and value.bit_length() <= 64):
        return repr(value)
    return f"a value of type {type(value).__name__}"


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


@dataclass(frozen=True)
class Bound:
    """What one field may hold: one of `types`, and for a str, bytes or list a length, for an int a
    value, from `least` to `most`. A list's items must each fit `items`, and their lengths add up
    to at most `total`. None passes where `types` includes NoneType, and then nothing else is checked."""

    types: type | tuple[type, ...]
    least: int = 0
    most: int = (1 << 63) - 1
    items: Bound | None = None
    total: int | None = None

    def check(self, kind: str, name: str, value: Any) -> None:
        if not isinstance(value, self.types) or (type(value) is bool and not _admits_bool(self.types)):
            raise ProtocolError(
                f"{kind} message field {name!r} must be {_names(self.types)}, got {type(value).__name__}"
            )
        if value is None or type(value) is bool:
            return
        size = value if isinstance(value, int) else len(value)
        if not self.least <= size <= self.most:
            what = "" if isinstance(value, int) else "the length of "
            raise ProtocolError(f"{kind} message field {name!r}: {what}{size} is outside {self.least}..{self.most}")
        if self.items is not None:
            for item in value:
                self.items.check(kind, f"{name} item", item)
            if self.total is not None and sum(len(item) for item in value) > self.total:
                raise ProtocolError(f"{kind} message field {name!r}: its items hold more than {self.total} in all")


def _admits_bool(types: type | tuple[type, ...]) -> bool:
    return bool in (types if isinstance(types, tuple) else (types,))


_NONE = type(None)
MAX_SLOTS = 4096  # envs one worker hosts at most
MAX_ALLOW = 64  # env id patterns one worker may name, each of at most MAX_PATTERN_CHARS ...
MAX_PATTERN_CHARS = 128
MAX_ALLOW_CHARS = 1024  # ... with this many characters in all: each is compiled once, at registration
KEY_CHARS = 40  # a Curve public key in z85
# The fields of the control messages the broker reads, bounded: any peer that reaches its port can
# send them, and a registration is kept (and matched on every lease) for as long as its worker lives.
CONTROL_BOUNDS: dict[str, dict[str, Bound]] = {
    HELLO: {
        "pid": Bound(int, 0, (1 << 32) - 1),
        "host": Bound(str, 0, 255),  # a host name is at most 253 characters
        "slots": Bound(int, 1, MAX_SLOTS),
        "allow": Bound((list, _NONE), 0, MAX_ALLOW, items=Bound(str, 1, MAX_PATTERN_CHARS), total=MAX_ALLOW_CHARS),
        "lease": Bound((str, _NONE), 1, 64),
        "lessee": Bound((bytes, _NONE), 1, 255),  # a ZeroMQ routing identity is at most 255 bytes
        "steps": Bound(int, 0),
        "trainer_key": Bound((str, _NONE), KEY_CHARS, KEY_CHARS),
    },
    LEASE: {
        "envs": Bound(int, 1, 1 << 20),
        "env_id": Bound(str, 1, 256),
        "endpoint": Bound(str, 1, 300),  # tcp://, a host name, a port
        "server_key": Bound((str, _NONE), KEY_CHARS, KEY_CHARS),
        "add": Bound((bool, _NONE)),
    },
    RELEASE: {},
    STATUS: {},
}


def check_control(message: dict[str, Any]) -> dict[str, Any]:
    """`check`, then the bounds of CONTROL_BOUNDS for the fields the broker reads from a message of
    that kind; raises ProtocolError for a kind the broker does not serve."""
    kind = check(message)["kind"]
    bounds = CONTROL_BOUNDS.get(kind)
    if bounds is None:
        raise ProtocolError(f"the broker does not serve {kind} messages")
    for name, bound in bounds.items():
        bound.check(kind, name, message.get(name))
    return message
