"""Packing: one message is a msgpack header frame followed by one raw frame per numpy array.

Arrays (and numpy scalars, which keep their dtype) appear in the header as msgpack extension
values that name their frame, dtype and shape, so an array is never copied into the header and
never pickled. Tuples survive the trip as tuples. Anything else that msgpack cannot carry is an
error, unless the link is trusted (a worker this process started itself, on a private socket):
then it is pickled with cloudpickle, as Gymnasium's AsyncVectorEnv does with every message.

The decoder bounds every size and rejects what it cannot read with a ProtocolError; it never
unpickles unless told the link is trusted.
"""

from __future__ import annotations

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


DEFAULT_LIMITS = Limits()
Frame = bytes | memoryview


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"envfarm carries numpy arrays of plain numbers or strings, not dtype {dtype}")


def pack(message: dict[str, Any], *, allow_pickle: bool = False) -> list[Frame]:
    """Encodes a message as [header, *array frames]. Raises TypeError for what it cannot carry."""
    frames: list[Frame] = [b""]

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            _check_dtype(obj.dtype)
            frames.append(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
            return msgpack.ExtType(EXT_ARRAY, msgpack.packb((len(frames) - 1, obj.dtype.str, obj.shape)))
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            array = np.asarray(obj)
            _check_dtype(array.dtype)
            frames.append(array.tobytes())
            return msgpack.ExtType(EXT_SCALAR, msgpack.packb((len(frames) - 1, array.dtype.str, ())))
        if type(obj) is tuple:
            return msgpack.ExtType(EXT_TUPLE, packer(list(obj)))
        if isinstance(obj, dict):  # an OrderedDict and friends travel as plain dicts
            return dict(obj)
        if allow_pickle:
            return msgpack.ExtType(EXT_PICKLE, cloudpickle.dumps(obj))
        raise TypeError(
            f"cannot send a value of type {type(obj).__qualname__} over an untrusted link: "
            "use numbers, strings, bytes, lists, tuples, dicts and numpy arrays"
        )

    def packer(obj: Any) -> bytes:
        return msgpack.packb(obj, default=default, use_bin_type=True, strict_types=True)

    frames[0] = packer(message)
    return frames


def unpack(frames: Sequence[Frame], *, allow_pickle: bool = False, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decodes [header, *array frames] into a dict. Raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError(f"message has {len(frames) - 1} array frames, more than the limit {limits.max_frames}")
    header = frames[0]
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(header)} bytes is over the limit of {limits.max_header_bytes}")

    def array_from(data: bytes, scalar: bool) -> Any:
        index, dtype_str, shape = msgpack.unpackb(data, use_list=True)
        if not (isinstance(index, int) and 1 <= index < len(frames)):
            raise ProtocolError(f"array refers to frame {index!r}, but the message has {len(frames) - 1}")
        if not isinstance(dtype_str, str) or len(dtype_str) > 16:
            raise ProtocolError(f"bad dtype {dtype_str!r:.40}")
        dtype = np.dtype(dtype_str)
        try:
            _check_dtype(dtype)
        except TypeError as e:
            raise ProtocolError(str(e)) from None
        if not (isinstance(shape, list) and len(shape) <= limits.max_ndim and all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError(f"bad array shape {shape!r:.80}")
        size = math.prod(shape) * dtype.itemsize
        buffer = frames[index]
        if size > limits.max_array_bytes or size != len(buffer):
            raise ProtocolError(f"array of dtype {dtype} and shape {tuple(shape)} needs {size} bytes, its frame has {len(buffer)}")
        array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        return array[()] if scalar else array.copy()

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_ARRAY or code == EXT_SCALAR:
            return array_from(data, scalar=code == EXT_SCALAR)
        if code == EXT_TUPLE:
            return tuple(unpacker(data))
        if code == EXT_PICKLE:
            if not allow_pickle:
                raise ProtocolError("refused a pickled value: this link is not trusted")
            return pickle.loads(data)
        raise ProtocolError(f"unknown msgpack extension type {code}")

    def unpacker(data: Frame) -> Any:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)

    try:
        message = unpacker(header)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack and numpy raise many kinds on garbage; all mean the same here
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message header must be a map, got {type(message).__name__}")
    return message
