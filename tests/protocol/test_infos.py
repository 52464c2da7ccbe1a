"""Infos batched by the worker merge exactly as Gymnasium's `_add_info` env by env would."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gymnasium.vector import VectorEnv
from hypothesis import given, settings
from hypothesis import strategies as st

from envfarm.protocol import infos as info_codec
from envfarm.protocol.errors import ProtocolError
from envfarm.protocol.packing import pack, unpack


class _Gymnasium:
    _add_info = VectorEnv._add_info

    def __init__(self, num_envs: int):
        self.num_envs = num_envs


def gymnasium_infos(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """What SyncVectorEnv returns for these per-env infos."""
    batcher, vector_infos = _Gymnasium(len(infos)), {}
    for i, info in enumerate(infos):
        vector_infos = batcher._add_info(vector_infos, info, i)
    return vector_infos


def over_the_wire(infos: list[dict[str, Any]], block_sizes: list[int]) -> dict[str, Any]:
    """Each block batched by its worker, packed and unpacked, and merged by the trainer."""
    vector_infos: dict[str, Any] = {}
    start = 0
    for size in block_sizes:
        block = info_codec.batch(infos[start : start + size])
        block = unpack(pack({"infos": block}))["infos"]
        vector_infos = info_codec.add_block(vector_infos, block, range(start, start + size), len(infos))
        start += size
    return vector_infos


def assert_same(actual: Any, expected: Any, where: str = "infos") -> None:
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, np.ndarray):
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        if expected.dtype.hasobject:
            for i, (a, e) in enumerate(zip(actual, expected)):
                assert_same(a, e, f"{where}[{i}]")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        assert actual == expected or (actual != actual and expected != expected), f"{where}: {actual!r} != {expected!r}"


leaf_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, width=64),
    st.booleans(),
    st.builds(np.float32, st.floats(-1e3, 1e3, width=32)),
    st.builds(np.int64, st.integers(-100, 100)),
    st.builds(np.bool_, st.booleans()),
    st.builds(lambda x: np.full(2, x, np.float64), st.floats(-1, 1)),
    st.builds(lambda x: np.full(3, x, np.float64), st.floats(-1, 1)),
    st.text(max_size=3),
    st.none(),
)
info_dicts = st.recursive(
    st.dictionaries(st.sampled_from(["a", "b", "c", "final_obs"]), leaf_values, max_size=3),
    lambda children: st.dictionaries(
        st.sampled_from(["a", "d", "nested"]), st.one_of(leaf_values, children), max_size=3
    ),
    max_leaves=6,
)


def uniform_infos(count: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Infos with the same keys and value types in every env, as most envs give them."""
    return st.builds(
        lambda xs, ys, arrays: [
            {"x_position": np.float64(x), "steps": int(y), "flag": y > 2, "vec": a} for x, y, a in zip(xs, ys, arrays)
        ],
        st.lists(st.floats(-10, 10), min_size=count, max_size=count),
        st.lists(st.integers(0, 5), min_size=count, max_size=count),
        st.lists(
            st.builds(lambda v: np.full(2, v, np.float32), st.floats(-1, 1, width=32)), min_size=count, max_size=count
        ),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(info_dicts, min_size=1, max_size=6), st.data())
def test_any_infos_merge_as_gymnasium_merges_them(infos: list[dict[str, Any]], data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, len(infos) - 1), max_size=3))) if len(infos) > 1 else []
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(infos)])]
    try:
        expected = gymnasium_infos(infos)
    except Exception as e:  # Gymnasium refuses some mixes (e.g. arrays of different shapes): so does envfarm
        with pytest.raises(type(e)):
            over_the_wire(infos, sizes)
        return
    assert_same(over_the_wire(infos, sizes), expected)


@settings(max_examples=50, deadline=None)
@given(uniform_infos(8))
def test_uniform_infos_travel_batched_and_merge_exactly(infos: list[dict[str, Any]]) -> None:
    block = info_codec.batch(infos[:4])
    assert isinstance(block, dict) and {kind for kind, _ in block.values()} == {"scalar", "int", "bool", "array"}
    assert_same(over_the_wire(infos, [4, 4]), gymnasium_infos(infos))


@settings(max_examples=200, deadline=None)
@given(st.lists(info_dicts, min_size=1, max_size=5))
def test_unbatch_gives_each_env_its_own_info_back(infos: list[dict[str, Any]]) -> None:
    block = unpack(pack({"infos": info_codec.batch(infos)}))["infos"]
    for actual, expected in zip(info_codec.unbatch(block, len(infos)), infos, strict=True):
        assert_same(actual, expected)


def test_empty_infos_cost_one_empty_map() -> None:
    assert info_codec.batch([{}, {}, {}]) == {}
    assert info_codec.add_block({}, {}, range(3), 3) == {}


def test_keys_gymnasium_would_take_for_masks_travel_as_they_are() -> None:
    infos = [{"_a": 1, "a": 2}, {"_a": 3, "a": 4}]
    assert info_codec.batch(infos) == infos


@pytest.mark.parametrize(
    "block",
    [
        {"a": ["int", np.zeros(2)]},  # wrong row count for 3 envs
        {"a": ["bogus", [1, 2, 3]]},
        {"a": ["values", [1, 2]]},
        {"a": "not an entry"},
        {"a": ["dict", [1, 2, 3]]},
        [{}, {}],
        "neither form",
    ],
)
def test_a_malformed_block_is_a_protocol_error(block: Any) -> None:
    with pytest.raises(ProtocolError):
        info_codec.add_block({}, block, range(3), 3)
    with pytest.raises(ProtocolError):
        info_codec.unbatch(block, 3)


def test_a_block_whose_type_differs_from_an_earlier_blocks_keeps_each_value_as_gymnasium_does() -> None:
    infos = [{"a": "text"}, {"a": 1.5}, {"a": 2.5}, {"a": np.float32(1)}, {"a": 7}, {"a": 8}]
    assert_same(over_the_wire(infos, [1, 2, 1, 2]), gymnasium_infos(infos))
    assert type(over_the_wire(infos, [1, 2, 1, 2])["a"][1]) is float
