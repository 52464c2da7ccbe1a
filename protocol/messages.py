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
    either  -> HEARTBEAT {}
    worker  -> ERROR   {error}                              the request as a whole failed

In farm mode a broker stands between them and leases workers to trainers:

    trainer -> LEASE   {envs, add?}                         -> LEASED {workers: [[identity, slots, host, pid], ...]}
    trainer -> RELEASE {}                                   -> RESULT {}
    anyone  -> STATUS  {}                                   -> RESULT {workers: [{...}], trainers}

A worker's HELLO then carries `slots`, how many envs it hosts at most.

"envs" are global env indices; per-env errors travel as [[env index, error data], ...], so one
failing env never hides the results of the others. The field types are checked by `check`.
"""

from __future__ import annotations

from typing import Any

from envfarm.protocol.errors import ProtocolError

PROTOCOL_VERSION = 1
WORKER_PREFIX, TRAINER_PREFIX = b"W", b"T"
HEARTBEAT_FRAME = b""
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_SUFFIX = b"/hb"  # a trainer's heartbeat socket: its identity plus this

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
HEARTBEAT = "heartbeat"
ERROR = "error"
LEASE = "lease"
LEASED = "leased"
RELEASE = "release"
LOST = "lost"
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
    HEARTBEAT: {},
    ERROR: {"error": dict},
    LEASE: {"envs": int},
    LEASED: {"workers": _list},
    RELEASE: {},
    LOST: {"reason": str},
    STATUS: {},
}


def make(kind: str, rid: int, **fields: Any) -> dict[str, Any]:
    """Builds a message of a known kind."""
    return {"kind": kind, "rid": rid, **fields}


def check(message: dict[str, Any]) -> dict[str, Any]:
    """Returns the message if its kind is known and its fields have the right types, else raises ProtocolError."""
    kind, rid = message.get("kind"), message.get("rid")
    fields = FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message kind {kind!r:.40}; known kinds: {', '.join(FIELDS)}")
    if type(rid) is not int:
        raise ProtocolError(f"{kind} message has no integer 'rid'")
    for name, types in fields.items():
        value = message.get(name)
        if not isinstance(value, types) or (types is int and type(value) is bool):
            raise ProtocolError(f"{kind} message field {name!r} must be {_names(types)}, got {type(value).__name__}")
    if kind == HELLO and message["version"] != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks envfarm protocol version {message['version']}, this side speaks {PROTOCOL_VERSION}")
    return message


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
