"""Errors as data: what crosses the wire when something goes wrong, and the one local error class."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any


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
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        trace = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
        return cls(name, str(exc), trace)

    def to_data(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_data(cls, data: Any) -> ErrorInfo:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("type", "message")):
            raise ProtocolError(f"an error must be a map with string 'type' and 'message', got {data!r:.200}")
        trace = data.get("traceback", "")
        return cls(data["type"], data["message"], trace if isinstance(trace, str) else "")
