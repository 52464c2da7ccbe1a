"""Packing: one message is a msgpack header frame followed by one raw frame per numpy array.

Arrays appear in the header as msgpack extension values that name their frame, dtype and shape,
so an array is never copied into the header and never pickled; numpy scalars (which keep their
dtype) are small and travel inside the header. Tuples survive the trip as tuples. Anything else that msgpack cannot carry is an
error, unless the link is trusted (a worker this process started itself, on a private socket):
then it is pickled with cloudpickle, as Gymnasium's AsyncVectorEnv does with every message.

The decoder bounds every size and rejects what it cannot read with a ProtocolError; it never
unpickles unless told the link is trusted.
"""

from __future__ import annotations

import functools
import math
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import cloudpickle
import msgpack
import numpy as np

from envfarm.protocol.errors import ProtocolError

EXT_ARRAY = 1
EXT_SCALAR = 2
EXT_TUPLE = 3
EXT_PICKLE = 4

# Plain numbers and fixed-width strings; never object, structured or sub-array dtypes.
ALLOWED_DTYPE_KINDS = frozenset("biufcSU")


@dataclass(frozen=True)
class Limits:
    """Bounds the decoder enforces on one message."""

    max_header_bytes: int = 64 << 20
    max_frames: int = 1 << 16
    max_array_bytes: int = 4 << 30
    max_ndim: int = 32
    max_tuple_depth: int = 32  # each level is a nested msgpack decode on the C stack


DEFAULT_LIMITS = Limits()
# Array metadata holds only ints and a str: one shared packer serves it (never re-entered).
_pack_meta = msgpack.Packer(use_bin_type=True).pack
Frame = bytes | memoryview


_allowed_dtypes: dict[np.dtype, str] = {}  # dtype -> its wire name, for dtypes already checked


def _wire_dtype(dtype: np.dtype) -> str:
    name = _allowed_dtypes.get(dtype)
    if name is None:
        if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise TypeError(f"envfarm carries numpy arrays of plain numbers or strings, not dtype {dtype}")
        name = _allowed_dtypes[dtype] = dtype.str
    return name


_scalar_prefixes: dict[np.dtype, bytes] = {}


def _scalar_prefix(dtype: np.dtype) -> bytes:
    prefix = _scalar_prefixes[dtype] = (_wire_dtype(dtype) + ":").encode("ascii")
    return prefix


_parsed_dtypes: dict[str, np.dtype] = {}


def _parse_dtype(name: Any) -> np.dtype:
    dtype = _parsed_dtypes.get(name) if isinstance(name, str) else None
    if dtype is None:
        if not isinstance(name, str) or len(name) > 16:
            raise ProtocolError(f"bad dtype {name!r:.40}")
        try:
            dtype = np.dtype(name)
            _wire_dtype(dtype)
        except TypeError as e:
            raise ProtocolError(str(e)) from None
        if len(_parsed_dtypes) < 1024:
            _parsed_dtypes[name] = dtype
    return dtype


def pack(message: dict[str, Any], *, allow_pickle: bool = False) -> list[Frame]:
    """Encodes a message as [header, *array frames]. Raises TypeError for what it cannot carry."""
    try:
        return _Encoder(allow_pickle).encode(message)
    except (ValueError, OverflowError) as e:  # e.g. an int over 64 bits, a str with a lone surrogate
        raise TypeError(f"cannot send this message: {type(e).__name__}: {e}") from None


def unpack(frames: Sequence[Frame], *, allow_pickle: bool = False, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decodes [header, *array frames] into a dict. Raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError(f"message has {len(frames) - 1} array frames, more than the limit {limits.max_frames}")
    if len(frames[0]) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(frames[0])} bytes is over the limit of {limits.max_header_bytes}")
    try:
        message = _Decoder(frames, allow_pickle, limits).decode(frames[0])
    except ProtocolError:
        raise
    except Exception as e:  # msgpack and numpy raise many kinds on garbage; all mean the same here
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message header must be a map, got {type(message).__name__}")
    return message


# Encoder and decoder are small objects rather than closures: closures that call each other form
# reference cycles, which would keep every message's frames (shared-memory views among them)
# alive until the cyclic garbage collector runs.
class _Encoder:
    def __init__(self, allow_pickle: bool):
        self.allow_pickle = allow_pickle
        self.frames: list[Frame] = [b""]

    def encode(self, message: dict[str, Any]) -> list[Frame]:
        self.frames[0] = self.packb(message)
        return self.frames

    def packb(self, obj: Any) -> bytes:
        return msgpack.packb(obj, default=self.default, use_bin_type=True, strict_types=True)

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            # Inline, as "<dtype>:<bytes>": infos carry many scalars, and a frame or a nested
            # msgpack document each would cost more than the value.
            if obj.dtype.itemsize == 0:  # an empty string scalar; its array has itemsize 1
                obj = np.asarray(obj)
            prefix = _scalar_prefixes.get(obj.dtype) or _scalar_prefix(obj.dtype)
            return _ext((EXT_SCALAR, prefix + obj.tobytes()))
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            frames = self.frames
            name = _wire_dtype(obj.dtype)
            frames.append((obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)).reshape(-1).view(np.uint8))
            return _ext((EXT_ARRAY, _pack_meta((len(frames) - 1, name, obj.shape))))
        if type(obj) is tuple:
            return _ext((EXT_TUPLE, self.packb(list(obj))))
        if isinstance(obj, dict):  # an OrderedDict and friends travel as plain dicts
            return dict(obj)
        if self.allow_pickle:
            return _ext((EXT_PICKLE, cloudpickle.dumps(obj)))
        if type(obj) is int:  # msgpack hands over only the ints it cannot carry
            raise TypeError(
                f"cannot send the integer {obj if obj.bit_length() <= 256 else '...'} over an untrusted link: "
                "msgpack carries integers of at most 64 bits (send it as a string or bytes)"
            )
        raise TypeError(
            f"cannot send a value of type {type(obj).__qualname__} over an untrusted link: "
            "use numbers, strings, bytes, lists, tuples, dicts and numpy arrays"
        )


# msgpack.ExtType's constructor re-checks its arguments, which costs more than the rest of
# packing a scalar; ours are always an int code and bytes.
_ext = functools.partial(tuple.__new__, msgpack.ExtType)


class _Decoder:
    def __init__(self, frames: Sequence[Frame], allow_pickle: bool, limits: Limits):
        self.frames = frames
        self.allow_pickle = allow_pickle
        self.limits = limits
        self.depth = 0

    def decode(self, data: Frame) -> Any:
        return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=False)

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_ARRAY:
            return self.array(data)
        if code == EXT_SCALAR:
            return self.scalar(data)
        if code == EXT_TUPLE:
            self.depth += 1
            if self.depth > self.limits.max_tuple_depth:
                raise ProtocolError(f"tuples nested deeper than the limit of {self.limits.max_tuple_depth}")
            value = tuple(self.decode(data))
            self.depth -= 1
            return value
        if code == EXT_PICKLE:
            if not self.allow_pickle:
                raise ProtocolError("refused a pickled value: this link is not trusted")
            return pickle.loads(data)
        raise ProtocolError(f"unknown msgpack extension type {code}")

    def scalar(self, data: bytes) -> Any:
        split = data.find(b":", 0, 17)
        if split < 0:
            raise ProtocolError("a numpy scalar must be '<dtype>:<bytes>'")
        dtype = _parse_dtype(data[:split].decode("ascii", "replace"))
        if len(data) - split - 1 != dtype.itemsize:
            raise ProtocolError(
                f"a numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes, got {len(data) - split - 1}"
            )
        return np.frombuffer(data, dtype=dtype, offset=split + 1)[0]

    def array(self, data: bytes) -> Any:
        frames, limits = self.frames, self.limits
        index, dtype_name, shape = msgpack.unpackb(data, use_list=True)
        if not (type(index) is int and 1 <= index < len(frames)):
            raise ProtocolError(f"array refers to frame {index!r}, but the message has {len(frames) - 1}")
        dtype = _parse_dtype(dtype_name)
        if not (
            isinstance(shape, list) and len(shape) <= limits.max_ndim and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise ProtocolError(f"bad array shape {shape!r:.80}")
        size = math.prod(shape) * dtype.itemsize
        if size > limits.max_array_bytes:
            raise ProtocolError(
                f"array of dtype {dtype} and shape {tuple(shape)} is {size} bytes, over the limit of {limits.max_array_bytes}"
            )
        buffer = frames[index]
        if size != len(buffer):
            raise ProtocolError(
                f"array of dtype {dtype} and shape {tuple(shape)} needs {size} bytes, its frame has {len(buffer)}"
            )
        return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()
