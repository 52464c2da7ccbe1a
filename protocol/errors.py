"""Errors as data: what crosses the wire when something goes wrong, and the one local error class."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

MAX_TYPE_CHARS = 200
MAX_MESSAGE_CHARS = 64 << 10
MAX_TRACEBACK_CHARS = 64 << 10


class ProtocolError(Exception):
    """A message that is malformed, oversized, of an unknown kind or of another protocol version.

    Raised by the decoders; the receiving process reports it and goes on serving.
    """


@dataclass(frozen=True)
class ErrorInfo:
    """An exception raised on the far side, as plain data."""

    type: str  # qualified class name, e.g. "ValueError" or "gymnasium.error.ResetNeeded"
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """The exception as data, each part cut to a size that a message carries: an env may raise
        with a message of any size, and an oversized reply would fail every env of its worker."""
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        trace = "".join(traceback.format_exception(kind, exc, exc.__traceback__))  # survives a failing __str__
        return cls(
            _cut(name, MAX_TYPE_CHARS),
            _cut(_message(exc), MAX_MESSAGE_CHARS),
            _cut(trace, MAX_TRACEBACK_CHARS, keep_end=True),
        )

    def to_data(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_data(cls, data: Any) -> ErrorInfo:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("type", "message")):
            raise ProtocolError(f"an error must be a map with string 'type' and 'message', got {data!r:.200}")
        trace = data.get("traceback", "")
        return cls(data["type"], data["message"], trace if isinstance(trace, str) else "")


def _message(exc: BaseException) -> str:
    """What str(exc) says, in a form that the trainer's rebuilt exception says again. A KeyError
    quotes its key (str(KeyError("x")) is "'x'"), and would quote it twice once rebuilt from that
    text: its message is the key itself. A __str__ that fails (or recurses without end, as repr
    of a deeply nested value does) is named instead."""
    if (
        isinstance(exc, KeyError)
        and type(exc).__str__ is KeyError.__str__
        and len(exc.args) == 1
        and isinstance(exc.args[0], str)
    ):
        return exc.args[0]
    try:
        return str(exc)
    except Exception as e:
        return f"<str() of the exception failed: {type(e).__name__}>"


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    """`text` if it has at most `limit` characters, else its head (and with `keep_end`, its tail,
    where a traceback names the exception), saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text) - limit} characters cut by envfarm ...]\n"
    if keep_end:
        return text[: limit // 2] + note + text[-(limit // 2) :]
    return text[:limit] + note.rstrip()
