"""Tests for envfarm.protocol.packing: pack/unpack round trips, hostile input, limits and pickle refusal."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections import OrderedDict

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from envfarm.protocol import DEFAULT_LIMITS, Limits, ProtocolError, pack, unpack
from envfarm.protocol.packing import EXT_ARRAY, EXT_PICKLE, EXT_SCALAR, EXT_TUPLE

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(message, **kwargs):
    return unpack(pack(message, **kwargs), **kwargs)


def ext(code: int, payload) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload))


def header(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --------------------------------------------------------------------------- strategies

# Every dtype the wire format allows, in both byte orders where that means something.
any_dtype = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128)),
    hnp.byte_string_dtypes(endianness="?", min_len=1, max_len=12),
    hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=12),
)

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
arrays = any_dtype.flatmap(lambda dt: hnp.arrays(dt, shapes))

# Views that are not C-contiguous (or are offset into a bigger buffer).
VIEWS = {
    "identity": lambda a: a,
    "transpose": lambda a: a.T,
    "step": lambda a: a[::2] if a.ndim else a,
    "reverse_last": lambda a: a[..., ::-1] if a.ndim else a,
    "offset": lambda a: a[1:] if a.ndim else a,
    "fortran": np.asfortranarray,
}
views = st.sampled_from(sorted(VIEWS))

# Plain values msgpack carries natively, plus tuples and nested containers.
no_surrogates = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
plain_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    no_surrogates,
    st.binary(max_size=20),
)
plain_values = st.recursive(
    plain_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(no_surrogates, st.integers(-(2**63), 2**63 - 1)), children, max_size=4),
    ),
    max_leaves=20,
)


def assert_same(got, want):
    """Equal values of exactly the same types, all the way down (arrays: same dtype, shape and bytes)."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
        assert got.shape == want.shape
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()
    elif isinstance(want, np.generic):
        assert got.dtype == want.dtype
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == want


# --------------------------------------------------------------------------- round trips


@FAST
@given(array=arrays, view=views)
def test_array_round_trip_keeps_dtype_shape_and_bytes(array, view):
    sent = VIEWS[view](array)
    got = roundtrip({"a": sent})["a"]
    assert_same(got, sent)


@FAST
@given(array=arrays, view=views)
def test_decoded_arrays_are_writable_copies(array, view):
    sent = VIEWS[view](array)
    keep = sent.copy()
    frames = pack({"a": sent, "b": [sent]})
    got = unpack(frames)
    for decoded in (got["a"], got["b"][0]):
        assert decoded.flags.writeable
        assert not np.shares_memory(decoded, sent)
        for frame in frames[1:]:
            assert not np.shares_memory(decoded, np.frombuffer(frame, np.uint8))
    # the two decoded arrays are independent of each other as well
    assert not np.shares_memory(got["a"], got["b"][0])
    if sent.size:
        got["a"].reshape(-1)[0] = got["a"].reshape(-1)[-1]
        assert np.ascontiguousarray(sent).tobytes() == np.ascontiguousarray(keep).tobytes()


def test_big_endian_and_non_contiguous_examples():
    base = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    for sent in (base, base.T, base[:, ::2, 1:], base.astype(">f8")[::-1], base.astype(">c16").swapaxes(0, 2)):
        got = roundtrip({"a": sent})["a"]
        assert got.dtype.str == sent.dtype.str
        np.testing.assert_array_equal(got, sent)


def test_zero_size_and_zero_dim_arrays():
    for sent in (
        np.zeros((0,), "f4"),
        np.zeros((3, 0, 2), ">u2"),
        np.array(7, "i8"),
        np.array("hé", "U2"),
        np.zeros((0,), "S3"),
    ):
        got = roundtrip({"a": sent})["a"]
        assert type(got) is np.ndarray
        assert got.shape == sent.shape and got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent)


@FAST
@given(array=any_dtype.flatmap(lambda dt: hnp.arrays(dt, ())))
def test_numpy_scalars_keep_exact_type_and_dtype(array):
    scalar = array[()]
    assert isinstance(scalar, np.generic)
    got = roundtrip({"s": scalar, "l": [scalar], "t": (scalar,)})
    for value in (got["s"], got["l"][0], got["t"][0]):
        assert type(value) is type(scalar)
        assert value.dtype == scalar.dtype
        assert np.asarray(value).tobytes() == np.asarray(scalar).tobytes()


@pytest.mark.parametrize(
    "scalar",
    [np.bytes_(b""), np.str_(""), np.array(["", "abc"])[0], np.array([b"", b"abc"])[0], np.array("é", "U5")[()]],
    ids=["bytes_", "str_", "str_-from-array", "bytes_-from-array", "str_-short"],
)
def test_empty_string_scalars(scalar):
    # an empty numpy string scalar has an itemsize-0 dtype (S0/U0) but tobytes() of one character
    got = roundtrip({"s": scalar})["s"]
    assert type(got) is type(scalar)
    assert got == scalar


def test_python_and_numpy_scalars_stay_distinct():
    message = {
        "f32": np.float32(1.5),
        "f64": np.float64(1.5),
        "pyfloat": 1.5,
        "i64": np.int64(3),
        "u8": np.uint8(3),
        "pyint": 3,
        "npbool": np.bool_(True),
        "pybool": True,
        "c64": np.complex64(1 + 2j),
        "str_": np.str_("x"),
        "bytes_": np.bytes_(b"x"),
        "pystr": "x",
        "pybytes": b"x",
    }
    got = roundtrip(message)
    for key, want in message.items():
        assert type(got[key]) is type(want), key
        assert got[key] == want, key
    assert type(got["pyfloat"]) is float and type(got["pyint"]) is int and type(got["pybool"]) is bool


@FAST
@given(value=plain_values)
def test_plain_values_round_trip_with_exact_types(value):
    got = roundtrip({"v": value})
    assert_same(got, {"v": value})


def test_containers_keep_their_kind():
    message = {
        "tuple": (1, (2, [3, (4,)]), ()),
        "list": [1, [2, (3,)], []],
        "nested": {"a": {1: {"b": (None, b"raw", "text")}}, 2: []},
        "empty": {},
        "none": None,
    }
    got = roundtrip(message)
    assert got == message
    assert type(got["tuple"]) is tuple and type(got["tuple"][1]) is tuple and type(got["tuple"][1][1]) is list
    assert type(got["list"]) is list and type(got["list"][1][1]) is tuple
    assert list(got["nested"]) == ["a", 2] and list(got["nested"]["a"]) == [1]


def test_arrays_inside_containers():
    a, b = np.arange(6.0).reshape(2, 3), np.array([True, False])
    got = roundtrip({"x": (a, [b, {"k": a.T}]), 5: {7: b}})
    np.testing.assert_array_equal(got["x"][0], a)
    np.testing.assert_array_equal(got["x"][1][0], b)
    np.testing.assert_array_equal(got["x"][1][1]["k"], a.T)
    np.testing.assert_array_equal(got[5][7], b)
    assert type(got["x"]) is tuple and type(got["x"][1]) is list


def test_ordered_dict_travels_as_dict():
    got = roundtrip({"o": OrderedDict([("b", 1), ("a", 2)])})
    assert got == {"o": {"b": 1, "a": 2}}
    assert list(got["o"]) == ["b", "a"]


def test_pack_frame_layout_is_header_then_one_frame_per_array():
    frames = pack({"a": np.zeros(3, "f4"), "b": [np.ones((2, 2), "u1"), np.float64(2.0)], "c": 1})
    assert len(frames) == 3  # numpy scalars travel inside the header
    assert [len(f) for f in frames[1:]] == [12, 4]
    assert isinstance(msgpack.unpackb(frames[0], strict_map_key=False, ext_hook=lambda c, d: c), dict)


# --------------------------------------------------------------------------- what pack refuses


class Custom:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is Custom and other.value == self.value


@pytest.mark.parametrize(
    "value, type_name",
    [
        (Custom(1), "Custom"),
        ({1, 2}, "set"),
        (object(), "object"),
        (1j, "complex"),
        (np.array([object()], dtype=object), "ndarray"),
    ],
)
def test_pack_refuses_arbitrary_objects_without_pickle(value, type_name):
    with pytest.raises(TypeError, match=type_name):
        pack({"v": [value]})


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
        np.zeros(2, dtype="datetime64[s]"),
        np.zeros(2, dtype="timedelta64[s]"),
        np.zeros(2, dtype="V4"),
    ],
)
def test_pack_refuses_unsupported_dtypes(array):
    with pytest.raises(TypeError, match="dtype"):
        pack({"a": array})
    with pytest.raises(TypeError, match="dtype"):
        pack({"a": array[0]})


# --------------------------------------------------------------------------- pickle


class Evil:
    """Unpickling this creates a file: a canary for code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_round_trips_on_a_trusted_link():
    message = {"obj": Custom([1, 2]), "nested": (Custom("x"), [Custom(None)]), "fn": lambda x: x + 1}
    got = roundtrip(message, allow_pickle=True)
    assert got["obj"] == Custom([1, 2])
    assert got["nested"] == (Custom("x"), [Custom(None)])
    assert got["fn"](1) == 2


def test_plain_values_do_not_use_pickle_even_when_allowed():
    frames = pack({"a": np.arange(3), "t": (1, "x"), "s": np.float32(2)}, allow_pickle=True)
    got = unpack(frames)  # readable without allow_pickle
    np.testing.assert_array_equal(got["a"], np.arange(3))
    assert got["t"] == (1, "x") and type(got["s"]) is np.float32


@pytest.mark.parametrize("where", ["top", "list", "tuple", "dict"])
def test_pickle_is_refused_without_executing_anything(tmp_path, where):
    canary = tmp_path / "pwned"
    evil = Evil(str(canary))
    value = {"top": evil, "list": [1, [evil]], "tuple": (1, (evil,)), "dict": {"a": {2: evil}}}[where]
    frames = pack({"v": value}, allow_pickle=True)
    with pytest.raises(ProtocolError, match="pickle"):
        unpack(frames)
    assert not canary.exists()
    # the canary is real: a trusted link does run it
    opened = unpack(frames, allow_pickle=True)
    try:
        assert canary.exists()
    finally:
        for v in (opened["v"], *(opened["v"] if isinstance(opened["v"], (list, tuple)) else ())):
            if hasattr(v, "close"):
                v.close()


def test_hand_crafted_pickle_ext_is_refused(tmp_path):
    import pickle

    canary = tmp_path / "pwned"
    payload = pickle.dumps(Evil(str(canary)))
    frames = [header({"v": msgpack.ExtType(EXT_PICKLE, payload)})]
    with pytest.raises(ProtocolError, match="pickle"):
        unpack(frames)
    assert not canary.exists()


def test_pack_without_allow_pickle_names_the_type():
    with pytest.raises(TypeError, match="Custom"):
        pack({"v": Custom(1)}, allow_pickle=False)


# --------------------------------------------------------------------------- malformed input


def test_empty_frame_list():
    with pytest.raises(ProtocolError, match="empty"):
        unpack([])


@pytest.mark.parametrize("value", [[1, 2], 3, "text", None, b"raw", msgpack.ExtType(EXT_TUPLE, msgpack.packb([1]))])
def test_header_must_be_a_map(value):
    with pytest.raises(ProtocolError, match="must be a map"):
        unpack([header(value)])


def test_truncated_and_trailing_garbage_headers():
    good = pack({"a": [1, 2, 3], "b": "text"})[0]
    with pytest.raises(ProtocolError, match="malformed"):
        unpack([good[:-1]])
    with pytest.raises(ProtocolError, match="malformed"):
        unpack([good + b"\x01"])


def test_unknown_extension_type():
    with pytest.raises(ProtocolError, match="extension type 42"):
        unpack([header({"x": msgpack.ExtType(42, b"")})])


@pytest.mark.parametrize("index", [0, 2, 99, -1, "1", 1.0, None])
def test_array_ext_referring_to_a_missing_frame(index):
    frames = [header({"a": ext(EXT_ARRAY, (index, "<f4", [1]))}), b"\0" * 4]
    with pytest.raises(ProtocolError, match="refers to frame"):
        unpack(frames)


@pytest.mark.parametrize("length", [0, 11, 13, 24])
def test_frame_length_must_match_dtype_and_shape(length):
    frames = [header({"a": ext(EXT_ARRAY, (1, "<f4", [3]))}), b"\0" * length]
    with pytest.raises(ProtocolError, match=r"needs 12 bytes, its frame has %d" % length):
        unpack(frames)


@pytest.mark.parametrize(
    "payload", [b"<f8:" + b"\0" * 4, b"<f8:" + b"\0" * 9, b"<f8" + b"\0" * 8, b"|O:" + b"\0" * 8, b"\xff\xfe:\0", b""]
)
def test_malformed_scalar_is_a_protocol_error(payload):
    with pytest.raises(ProtocolError):
        unpack([header({"a": msgpack.ExtType(EXT_SCALAR, payload)})])


@pytest.mark.parametrize(
    "dtype_str, cause",
    [
        ("O", "object"),
        ("|O", "object"),
        ("i4,f4", "dtype"),
        ("(2,)i4", "dtype"),
        ("V8", "dtype"),
        ("M8[s]", "datetime64"),
        ("m8", "timedelta64"),
        ("not-a-dtype", "not understood"),
        ("", "not understood"),
        ("f" * 17, "bad dtype"),
        (4, "bad dtype"),
        (None, "bad dtype"),
    ],
)
def test_forbidden_or_bad_dtype_strings(dtype_str, cause):
    frames = [header({"a": ext(EXT_ARRAY, (1, dtype_str, [1]))}), b"\0" * 8]
    with pytest.raises(ProtocolError, match=cause):
        unpack(frames)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], [True], "3", 3, None, [1] * 33, [[1]]])
def test_bad_shapes(shape):
    frames = [header({"a": ext(EXT_ARRAY, (1, "u1", shape))}), b"\0"]
    with pytest.raises(ProtocolError, match="bad array shape"):
        unpack(frames)


def test_max_ndim_limit():
    frames = pack({"a": np.zeros((1, 1, 1), "u1")})
    assert unpack(frames, limits=Limits(max_ndim=3))["a"].shape == (1, 1, 1)
    with pytest.raises(ProtocolError, match="bad array shape"):
        unpack(frames, limits=Limits(max_ndim=2))


def test_ext_payload_that_is_not_a_triple():
    for payload in ([1, "f4"], [1, "f4", [1], 4], "x", 7):
        with pytest.raises(ProtocolError):
            unpack([header({"a": ext(EXT_ARRAY, payload)}), b"\0" * 4])


def test_header_limit():
    frames = pack({"s": "x" * 200})
    size = len(frames[0])
    assert unpack(frames, limits=Limits(max_header_bytes=size))["s"] == "x" * 200
    with pytest.raises(ProtocolError, match=rf"header of {size} bytes is over the limit of {size - 1}"):
        unpack(frames, limits=Limits(max_header_bytes=size - 1))


def test_frame_count_limit():
    frames = pack({"a": [np.zeros(1), np.zeros(1), np.zeros(1)]})
    assert len(unpack(frames, limits=Limits(max_frames=3))["a"]) == 3
    with pytest.raises(ProtocolError, match="3 array frames, more than the limit 2"):
        unpack(frames, limits=Limits(max_frames=2))
    # extra frames nobody refers to count too
    with pytest.raises(ProtocolError, match="more than the limit"):
        unpack([pack({})[0], b"", b""], limits=Limits(max_frames=1))


def test_array_size_limit():
    frames = pack({"a": np.zeros(25, "f4")})  # 100 bytes
    assert unpack(frames, limits=Limits(max_array_bytes=100))["a"].nbytes == 100
    with pytest.raises(ProtocolError, match="is 100 bytes, over the limit of 99"):
        unpack(frames, limits=Limits(max_array_bytes=99))


def test_huge_claimed_shape_is_refused_without_allocating():
    frames = [header({"a": ext(EXT_ARRAY, (1, "<f8", [2**40, 2**40]))}), b""]
    with pytest.raises(ProtocolError, match="over the limit"):
        unpack(frames)


def test_zero_itemsize_dtype_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        unpack([header({"a": ext(EXT_ARRAY, (1, "S0", [5]))}), b""])


def test_deeply_nested_lists_are_a_protocol_error():
    hostile = b"\x81\xa1x" + b"\x91" * 5000 + b"\x01"
    with pytest.raises(ProtocolError, match="malformed"):
        unpack([hostile])


def test_deeply_nested_tuple_exts_do_not_crash_the_process(tmp_path):
    # Runs in a child process (a crash must not take the test run with it), decoding on a thread with
    # the usual 8 MiB stack so that the outcome does not depend on this machine's `ulimit -s`.
    script = textwrap.dedent(
        """
        import threading
        import msgpack
        from envfarm.protocol import ProtocolError, unpack
        from envfarm.protocol.packing import EXT_TUPLE
        inner = msgpack.packb(1)
        for _ in range(2000):
            inner = msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\\x91" + inner))
        hostile = msgpack.packb({"x": msgpack.ExtType(EXT_TUPLE, b"\\x91" + inner)})
        assert len(hostile) < 16 * 1024
        outcome = []
        def decode():
            try:
                unpack([hostile])
            except ProtocolError:
                outcome.append("refused")
            else:
                outcome.append("decoded")
        threading.stack_size(8 << 20)
        thread = threading.Thread(target=decode)
        thread.start()
        thread.join()
        print(*outcome)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, f"receiver died with return code {result.returncode}: {result.stderr[-500:]}"
    assert result.stdout.strip() in ("refused", "decoded")


def test_scalar_in_the_old_frame_form_is_refused():
    frames = [header({"s": ext(EXT_SCALAR, (1, "<f4", [3]))}), bytearray(12)]
    with pytest.raises(ProtocolError):
        unpack(frames)


# --------------------------------------------------------------------------- fuzzing


@FUZZ
@given(head=st.binary(max_size=200), rest=st.lists(st.binary(max_size=32), max_size=3))
def test_random_bytes_only_ever_raise_protocol_error(head, rest):
    try:
        message = unpack([head, *rest], limits=Limits(max_array_bytes=1 << 16))
    except ProtocolError:
        return
    assert isinstance(message, dict)


@st.composite
def mutated_messages(draw):
    """A valid message's header with a few bytes flipped, inserted or deleted."""
    value = draw(plain_values)
    array = draw(arrays)
    frames = pack({"v": value, "a": array, "t": (array,)})
    head = bytearray(frames[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(head) - 1, 0)))
        if op == "flip" and head:
            head[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            head.insert(pos, draw(st.integers(0, 255)))
        elif head:
            del head[pos]
    return [bytes(head), *frames[1:]]


@FUZZ
@given(frames=mutated_messages())
def test_mutated_headers_only_ever_raise_protocol_error(frames):
    try:
        message = unpack(frames)
    except ProtocolError:
        return
    assert isinstance(message, dict)


array_ext_payloads = st.tuples(
    st.one_of(st.integers(-2, 4), st.none(), st.text(max_size=2)),
    st.one_of(
        st.sampled_from(["<f4", ">i2", "u1", "?", "S3", "<U2", "O", "V4", "i4,i4", "(2,)f4", "M8", "S0", "c16", "f2"]),
        st.text(max_size=18),
        st.integers(-(2**63), 2**63 - 1),
    ),
    st.one_of(st.lists(st.integers(-2, 5), max_size=5), st.integers(-(2**63), 2**64 - 1), st.none()),
)


@FUZZ
@given(
    payload=array_ext_payloads,
    code=st.sampled_from([EXT_ARRAY, EXT_SCALAR, EXT_TUPLE, EXT_PICKLE, 0, 9]),
    frames=st.lists(st.binary(max_size=48), max_size=3),
)
def test_random_array_ext_payloads_decode_consistently_or_raise_protocol_error(payload, code, frames):
    try:
        message = unpack([header({"a": ext(code, payload)}), *frames])
    except ProtocolError:
        return
    value = message["a"]
    if code == EXT_ARRAY:
        index, dtype_str, shape = payload
        assert isinstance(value, np.ndarray) and value.flags.writeable
        assert value.dtype == np.dtype(dtype_str) and value.shape == tuple(shape)
        assert value.tobytes() == bytes(frames[index - 1])
    elif code == EXT_SCALAR:
        assert isinstance(value, np.generic)


def test_default_limits_are_the_module_defaults():
    assert DEFAULT_LIMITS == Limits()
    assert DEFAULT_LIMITS.max_ndim >= 8 and DEFAULT_LIMITS.max_frames >= 1024


def test_an_integer_over_64_bits_is_refused_naming_the_cause():
    # e.g. Gymnasium's np_random_seed of an unseeded env: 128 bits of entropy
    with pytest.raises(TypeError, match="integers of at most 64 bits"):
        pack({"value": 2**100})
