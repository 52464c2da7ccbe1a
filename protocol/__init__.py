"""envfarm's wire format: message set, packing, space codec and errors as data.

Pure functions and data: nothing here opens a socket or starts a process. docs/protocol.md is
the specification; these modules are its reference implementation.
"""

from envfarm.protocol.errors import ErrorInfo, ProtocolError
from envfarm.protocol.messages import PROTOCOL_VERSION
from envfarm.protocol.packing import DEFAULT_LIMITS, Limits, pack, unpack
from envfarm.protocol.spaces import UnsupportedSpaceError, decode_space, encode_space

__all__ = [
    "DEFAULT_LIMITS",
    "ErrorInfo",
    "Limits",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "UnsupportedSpaceError",
    "decode_space",
    "encode_space",
    "pack",
    "unpack",
]
