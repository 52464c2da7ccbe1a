"""Tests for envfarm.protocol.spaces: the space codec, split/join and the shared-memory layout."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector.utils import concatenate, create_empty_array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from envfarm.protocol import ProtocolError, UnsupportedSpaceError, decode_space, encode_space, pack, unpack
from envfarm.protocol.spaces import FIXED_LEAVES, batch_layout, is_fixed, join, leaves, shm_layout, split

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
SLOWER = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def over_the_wire(space: spaces.Space) -> spaces.Space:
    """encode_space -> pack -> unpack -> decode_space, as a space travels between two processes."""
    return decode_space(unpack(pack({"space": encode_space(space)}))["space"])


def transfer(value):
    return unpack(pack({"v": value}))["v"]


# --------------------------------------------------------------------------- strategies

small_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3)


@st.composite
def boxes(draw, sampleable: bool = False):
    dtype = np.dtype(draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES + [np.bool_])))
    shape = draw(small_shapes)
    if dtype.kind == "b":
        return spaces.Box(0, 1, shape=shape, dtype=dtype)
    if dtype.kind == "f":
        bound = 2.0**14 if dtype.itemsize == 2 else 2.0**60
        values = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
        a = draw(hnp.arrays(dtype, shape, elements=values))
        b = draw(hnp.arrays(dtype, shape, elements=values))
        low, high = np.minimum(a, b), np.maximum(a, b)
        if draw(st.booleans()):
            low = np.where(draw(hnp.arrays(np.bool_, shape)), -np.inf, low).astype(dtype)
        if draw(st.booleans()):
            high = np.where(draw(hnp.arrays(np.bool_, shape)), np.inf, high).astype(dtype)
        return spaces.Box(low, high, dtype=dtype)
    info = np.iinfo(dtype)
    lo, hi = (max(int(info.min), -1000), min(int(info.max), 1000)) if sampleable else (int(info.min), int(info.max))
    if sampleable and dtype == np.int64:
        hi = min(hi, 2**62)
    values = st.integers(lo, hi)
    a = draw(hnp.arrays(dtype, shape, elements=values))
    b = draw(hnp.arrays(dtype, shape, elements=values))
    low, high = np.minimum(a, b), np.maximum(a, b)
    if draw(st.booleans()) and not sampleable:
        # Python scalar bounds, infinite ones included for signed ints
        low = float("-inf") if dtype.kind == "i" and draw(st.booleans()) else int(low.min())
        high = float("inf") if dtype.kind == "i" and draw(st.booleans()) else int(high.max())
        return spaces.Box(low, high, shape=shape, dtype=dtype)
    return spaces.Box(low, high, dtype=dtype)


@st.composite
def discretes(draw):
    dtype = np.dtype(draw(st.sampled_from(INT_DTYPES)))
    info = np.iinfo(dtype)
    n = draw(st.integers(1, min(int(info.max), 2**31)))
    start = draw(st.integers(max(int(info.min), -(2**31)), min(int(info.max) - n + 1, 2**31)))
    return spaces.Discrete(n, start=start, dtype=dtype)


@st.composite
def multi_discretes(draw):
    dtype = np.dtype(draw(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32])))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    nvec = draw(hnp.arrays(dtype, shape, elements=st.integers(1, 100)))
    if draw(st.booleans()):
        lo = -20 if dtype.kind == "i" else 0
        start = draw(hnp.arrays(dtype, shape, elements=st.integers(lo, 20)))
        return spaces.MultiDiscrete(nvec, dtype=dtype, start=start)
    return spaces.MultiDiscrete(nvec, dtype=dtype)


multi_binaries = st.one_of(
    st.integers(1, 10).map(spaces.MultiBinary),
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(spaces.MultiBinary),
)

charsets = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: len(set(s)) == len(s)
)


@st.composite
def texts(draw, sampleable: bool = False):
    min_length = draw(st.integers(0, 5))
    max_length = draw(st.integers(max(min_length, 1), 12))
    if draw(st.booleans()):
        return spaces.Text(max_length, min_length=min_length)
    charset = draw(charsets)
    if sampleable:
        # Gymnasium's Text.sample goes through a numpy 'U' array, which drops "\0" characters
        charset = charset.replace("\0", "") or "a"
    return spaces.Text(max_length, min_length=min_length, charset=charset)


def leaf_spaces(sampleable: bool = False):
    return st.one_of(boxes(sampleable), discretes(), multi_discretes(), multi_binaries, texts(sampleable))


keys = st.text("abcdefghij_", min_size=1, max_size=6)


def nested_spaces(sampleable: bool = False):
    return st.recursive(
        leaf_spaces(sampleable),
        lambda children: st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3).map(spaces.Dict),
            st.lists(children, min_size=1, max_size=3).map(spaces.Tuple),
            st.builds(spaces.Sequence, children, stack=st.booleans()),
            st.lists(children, min_size=1, max_size=3).map(spaces.OneOf),
        ),
        max_leaves=6,
    )


def dict_tuple_spaces(sampleable: bool = False):
    """Nested Dict/Tuple spaces whose leaves are anything, the shape split/join and shm_layout work on."""
    other = st.one_of(
        texts(sampleable),
        st.builds(spaces.Sequence, leaf_spaces(sampleable), stack=st.booleans()),
        st.lists(leaf_spaces(sampleable), min_size=1, max_size=2).map(spaces.OneOf),
    )
    return st.recursive(
        st.one_of(leaf_spaces(sampleable), other),
        lambda children: st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3).map(spaces.Dict),
            st.lists(children, min_size=1, max_size=3).map(spaces.Tuple),
        ),
        max_leaves=8,
    )


def assert_same_space(got: spaces.Space, want: spaces.Space):
    """Structural equality that is stricter than Space.__eq__ (exact bounds, dtypes and Dict key order)."""
    assert type(got) is type(want)
    assert got == want
    if isinstance(want, spaces.Box):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.low.tobytes() == want.low.tobytes() and got.high.tobytes() == want.high.tobytes()
    elif isinstance(want, spaces.Discrete):
        assert (got.n, got.start, got.dtype) == (want.n, want.start, want.dtype)
    elif isinstance(want, spaces.MultiDiscrete):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.nvec, want.nvec)
        np.testing.assert_array_equal(got.start, want.start)
    elif isinstance(want, spaces.MultiBinary):
        assert got.shape == want.shape and got.dtype == want.dtype
    elif isinstance(want, spaces.Text):
        assert (got.min_length, got.max_length, got.character_set) == (
            want.min_length,
            want.max_length,
            want.character_set,
        )
    elif isinstance(want, spaces.Dict):
        assert list(got.spaces) == list(want.spaces)
        for key in want.spaces:
            assert_same_space(got.spaces[key], want.spaces[key])
    elif isinstance(want, (spaces.Tuple, spaces.OneOf)):
        assert len(got.spaces) == len(want.spaces)
        for g, w in zip(got.spaces, want.spaces):
            assert_same_space(g, w)
    elif isinstance(want, spaces.Sequence):
        assert got.stack == want.stack
        assert_same_space(got.feature_space, want.feature_space)


def assert_same_value(got, want):
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same_value(got[key], want[key])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_value(g, w)
    else:
        assert got == want


# --------------------------------------------------------------------------- codec round trips


@FAST
@given(space=boxes())
def test_box_round_trip(space):
    assert_same_space(over_the_wire(space), space)


def test_box_with_infinite_float_bounds():
    low = np.array([-np.inf, 0.0, -1.0], np.float32)
    high = np.array([np.inf, np.inf, 2.5], np.float32)
    space = spaces.Box(low, high, dtype=np.float32)
    got = over_the_wire(space)
    assert_same_space(got, space)
    np.testing.assert_array_equal(got.bounded_below, [False, True, True])
    np.testing.assert_array_equal(got.bounded_above, [False, False, True])


def test_integer_box_with_infinite_bounds_stays_unbounded():
    space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.int32)
    assert not space.is_bounded("both")
    got = over_the_wire(space)
    assert got == space
    assert not got.is_bounded("both")


@FAST
@given(space=discretes())
def test_discrete_round_trip(space):
    assert_same_space(over_the_wire(space), space)


@FAST
@given(space=multi_discretes())
def test_multi_discrete_round_trip(space):
    assert_same_space(over_the_wire(space), space)


def test_multi_discrete_2d_with_start():
    space = spaces.MultiDiscrete(np.array([[2, 3], [4, 5]]), start=np.array([[-1, 0], [10, -7]]), dtype=np.int32)
    got = over_the_wire(space)
    assert_same_space(got, space)
    assert got.shape == (2, 2)


@FAST
@given(space=multi_binaries)
def test_multi_binary_round_trip(space):
    assert_same_space(over_the_wire(space), space)


@FAST
@given(space=texts())
def test_text_round_trip(space):
    assert_same_space(over_the_wire(space), space)


@SLOWER
@given(space=nested_spaces())
def test_nested_space_round_trip(space):
    assert_same_space(over_the_wire(space), space)


def test_every_supported_composite_by_hand():
    space = spaces.Dict(
        {
            "obs": spaces.Box(-1, 1, (3, 2), np.float64),
            "ids": spaces.Tuple([spaces.Discrete(5, start=-2), spaces.MultiBinary([2, 2])]),
            "text": spaces.Text(8, min_length=2, charset="xyz"),
            "seq": spaces.Sequence(spaces.MultiDiscrete([3, 4]), stack=True),
            "loose": spaces.Sequence(spaces.Text(3), stack=False),
            "any": spaces.OneOf([spaces.Discrete(2), spaces.Box(0, 1, (1,))]),
            "inner": spaces.Dict({"z": spaces.Discrete(3), "a": spaces.Box(0, 255, (4,), np.uint8)}),
        }
    )
    assert_same_space(over_the_wire(space), space)


def test_dict_with_int_keys():
    space = spaces.Dict({3: spaces.Discrete(2), 1: spaces.Box(0, 1, (2,))})
    got = over_the_wire(space)
    assert_same_space(got, space)
    assert list(got.spaces) == [1, 3]


@pytest.mark.parametrize(
    "space",
    [
        spaces.Dict(OrderedDict([("b", spaces.Discrete(2)), ("a", spaces.Box(0, 1, (2,)))])),
        spaces.Dict([("b", spaces.Discrete(2)), ("a", spaces.Box(0, 1, (2,)))]),
        spaces.Dict({"b": spaces.Discrete(2), "a": spaces.Box(0, 1, (2,))}, sort_keys=False),
    ],
    ids=["OrderedDict", "pairs", "sort_keys=False"],
)
def test_dict_key_order_survives_the_trip(space):
    got = over_the_wire(space)
    assert list(got.spaces) == list(space.spaces)
    assert [type(leaf) for leaf in leaves(got)] == [type(leaf) for leaf in leaves(space)]


def test_encoded_space_is_plain_data():
    encoded = encode_space(spaces.Dict({"a": spaces.Box(0, 1, (2,)), "b": spaces.Tuple([spaces.Discrete(3)])}))
    assert encoded["type"] == "Dict"
    frames = pack({"s": encoded})  # no pickle needed
    assert len(frames) == 5  # header + Box low, high, bounded_below, bounded_above


def test_decode_space_passes_a_space_object_through():
    space = spaces.Box(0, 1, (2,))
    assert decode_space(space) is space


@pytest.mark.parametrize(
    "data",
    [
        None,
        5,
        "Box",
        [],
        {},
        {"type": "Nope"},
        {"type": "Box"},
        {"type": "Box", "low": np.zeros(2), "high": np.zeros(3), "dtype": "<f4"},
        {"type": "Box", "low": np.ones(2, "f4"), "high": np.zeros(2, "f4"), "dtype": "<f4"},
        {"type": "Discrete", "n": 0, "start": 0, "dtype": "<i8"},
        {"type": "Discrete", "n": 3, "start": 0, "dtype": "<f8"},
        {"type": "MultiBinary", "n": -1},
        {"type": "Text", "min_length": 5, "max_length": 2, "charset": "ab"},
        {"type": "Dict", "spaces": [["a"]]},
        {"type": "Tuple", "spaces": [{"type": "Nope"}]},
        {"type": "Sequence", "feature_space": None, "stack": False},
        {"type": "OneOf", "spaces": 7},
    ],
)
def test_decode_space_rejects_malformed_data(data):
    with pytest.raises(ProtocolError, match="space"):
        decode_space(data)


# --------------------------------------------------------------------------- unsupported spaces


class MySpace(spaces.Space):
    def __init__(self):
        super().__init__((), np.float32)

    def sample(self, mask=None, probability=None):
        return 0.0

    def contains(self, x):
        return True


@pytest.mark.parametrize(
    "space, name",
    [
        (spaces.Graph(node_space=spaces.Box(0, 1, (2,)), edge_space=spaces.Discrete(3)), "Graph"),
        (MySpace(), "MySpace"),
        (spaces.Dict({"ok": spaces.Discrete(2), "bad": MySpace()}), "MySpace"),
        (spaces.Tuple([spaces.Discrete(2), spaces.Sequence(MySpace())]), "MySpace"),
        (spaces.OneOf([spaces.Graph(node_space=spaces.Discrete(2), edge_space=None)]), "Graph"),
    ],
)
def test_unsupported_space_names_the_class(space, name):
    with pytest.raises(UnsupportedSpaceError, match=name) as info:
        encode_space(space)
    assert isinstance(info.value, TypeError)


# --------------------------------------------------------------------------- samples

# Gymnasium's Box(dtype=bool, shape=()).sample() returns a numpy scalar, and Box.contains warns on it
gym_scalar_sample_warning = pytest.mark.filterwarnings("ignore:.*Casting input x to numpy array")


@gym_scalar_sample_warning
@SLOWER
@given(space=nested_spaces(sampleable=True), seed=st.integers(0, 2**32 - 1))
def test_samples_survive_packing_and_stay_in_the_space(space, seed):
    space.seed(seed)
    sample = space.sample()
    got = transfer(sample)
    assert space.contains(got)
    assert over_the_wire(space).contains(got)


@gym_scalar_sample_warning
@SLOWER
@given(space=dict_tuple_spaces(sampleable=True), seed=st.integers(0, 2**32 - 1))
def test_split_join_round_trip(space, seed):
    space.seed(seed)
    sample = space.sample()
    parts = split(space, sample)
    assert len(parts) == len(leaves(space))
    rebuilt = join(space, iter(parts))
    assert_same_value(rebuilt, sample)
    # each part is the leaf's own value
    for leaf, part in zip(leaves(space), parts):
        assert leaf.contains(part)
    # and the parts can travel on their own
    assert_same_value(join(space, iter(transfer(parts))), sample)


@SLOWER
@given(space=dict_tuple_spaces(sampleable=True), n=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_split_of_a_batch_matches_shm_layout(space, n, seed):
    space.seed(seed)
    items = [space.sample() for _ in range(n)]
    batch = concatenate(space, items, create_empty_array(space, n))
    parts = split(space, batch)
    layout, _ = shm_layout(space, n)
    assert len(parts) == len(layout)
    for leaf, part, region in zip(leaves(space), parts, layout):
        if region is None:
            assert not is_fixed(leaf)
            assert isinstance(part, tuple) and len(part) == n
        else:
            _, dtype, shape = region
            assert isinstance(part, np.ndarray)
            assert part.dtype.str == dtype and part.shape == shape
    assert_same_value(join(space, iter(parts)), batch)


def test_leaves_order_is_depth_first_in_space_order():
    a, b, c, d = spaces.Discrete(2), spaces.Text(3), spaces.Box(0, 1, (1,)), spaces.MultiBinary(2)
    space = spaces.Tuple([spaces.Dict({"x": a, "y": spaces.Tuple([b, c])}), d])
    assert leaves(space) == [a, b, c, d]
    assert all(x is y for x, y in zip(leaves(space), [a, b, c, d]))
    assert split(space, (({"x": 1, "y": ("t", 2)}), 3)) == [1, "t", 2, 3]
    assert join(space, iter([1, "t", 2, 3])) == ({"x": 1, "y": ("t", 2)}, 3)


def test_sequence_and_oneof_are_leaves():
    seq = spaces.Sequence(spaces.Dict({"a": spaces.Discrete(2)}))
    one = spaces.OneOf([spaces.Tuple([spaces.Discrete(2)])])
    assert leaves(seq) == [seq] and leaves(one) == [one]
    assert not is_fixed(seq) and not is_fixed(one) and not is_fixed(spaces.Text(2))
    assert all(
        is_fixed(s) for s in (spaces.Box(0, 1), spaces.Discrete(2), spaces.MultiDiscrete([2]), spaces.MultiBinary(2))
    )


# --------------------------------------------------------------------------- shm_layout


@FAST
@given(space=dict_tuple_spaces(), n=st.integers(0, 5), start=st.sampled_from([0, 64, 4096]))
def test_shm_layout_regions_are_aligned_disjoint_and_fit(space, n, start):
    align = 64
    layout, total = shm_layout(space, n, start)
    lvs = leaves(space)
    assert len(layout) == len(lvs)
    assert total >= 0 and total % align == 0
    regions = []
    for leaf, region in zip(lvs, layout):
        if not isinstance(leaf, FIXED_LEAVES):
            assert region is None
            continue
        offset, dtype, shape = region
        assert dtype == leaf.dtype.str
        assert shape == (n, *leaf.shape)
        assert offset % align == 0 and offset >= start
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert offset + nbytes <= total
        regions.append((offset, nbytes))
    regions.sort()
    for (o1, s1), (o2, _) in zip(regions, regions[1:]):
        assert o1 + s1 <= o2
    # the arrays really fit and do not overlap: write each, then read all back
    buffer = bytearray(total)
    views = []
    for i, region in enumerate(layout):
        if region is None:
            continue
        offset, dtype, shape = region
        view = np.ndarray(shape, np.dtype(dtype), buffer=buffer, offset=offset)
        view.view(np.uint8).reshape(-1)[:] = i % 251 + 1
        views.append((view, i))
    for view, i in views:
        assert (view.view(np.uint8) == i % 251 + 1).all()


def test_shm_layout_example():
    space = spaces.Dict(
        {
            "a": spaces.Box(0, 1, (3,), np.float32),
            "b": spaces.Text(4),
            "c": spaces.Discrete(5),
            "d": spaces.MultiBinary([2, 5]),
        }
    )
    layout, total = shm_layout(space, 4)
    assert layout == [(0, "<f4", (4, 3)), None, (64, "<i8", (4,)), (128, "|i1", (4, 2, 5))]
    assert total == 192


def test_shm_layout_of_a_space_without_fixed_leaves():
    layout, total = shm_layout(spaces.Tuple([spaces.Text(3), spaces.Sequence(spaces.Discrete(2))]), 8)
    assert layout == [None, None] and total == 0


def test_batch_layout_places_every_section_apart():
    observation_space, action_space = (
        spaces.Dict({"x": spaces.Box(0, 1, (3,)), "t": spaces.Text(3)}),
        spaces.Discrete(4),
    )
    layout, total = batch_layout(observation_space, action_space, 5)
    regions = [r for r in layout["obs"] + layout["actions"] if r is not None]
    regions += [layout["rewards"], layout["terminated"], layout["truncated"]]
    assert layout["obs"][0] is None  # Dict sorts its keys: "t" (Text) comes first
    assert layout["rewards"][1:] == ("<f8", (5,)) and layout["terminated"][1:] == ("|b1", (5,))
    ends = sorted((offset, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize) for offset, dtype, shape in regions)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ends, ends[1:]))
    assert ends[-1][1] <= total and all(offset % 64 == 0 for offset, _ in ends)
