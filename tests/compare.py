"""Strict structural equality for vector env outputs: same types, dtypes, shapes and values."""

from __future__ import annotations

from typing import Any

import numpy as np


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: expected ndarray, got {type(actual).__name__}"
        assert expected.dtype == actual.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert expected.shape == actual.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        if expected.dtype == object:
            for i, (e, a) in enumerate(zip(expected, actual)):
                assert_same(e, a, f"{path}[{i}]")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=path)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected dict, got {type(actual).__name__}"
        assert list(expected) == list(actual) or set(expected) == set(actual), (
            f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        )
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (tuple, list)):
        assert type(expected) is type(actual), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(expected) == len(actual), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]")
    else:
        assert type(expected) is type(actual), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        assert expected == actual, f"{path}: {actual!r} != {expected!r}"
