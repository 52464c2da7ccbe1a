"""Errors as data: their size is bounded at the source, and they come back as the user saw them."""

from __future__ import annotations

import pytest

from envfarm.client.errors import rebuild
from envfarm.protocol import ErrorInfo, pack, unpack
from envfarm.protocol import messages as m
from envfarm.protocol.errors import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS, MAX_TYPE_CHARS


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - capturing for the test
        return e


def over_the_wire(exc: BaseException) -> BaseException:
    """The exception as a trainer raises it after a worker sent it in an ERROR reply."""
    data = unpack(pack(m.make(m.ERROR, 1, error=ErrorInfo.from_exception(exc).to_data())))["error"]
    return rebuild(ErrorInfo.from_data(data), "env 0")


def test_a_50_mb_message_is_cut_and_still_travels():
    info = ErrorInfo.from_exception(raised(ValueError("x" * 50_000_000)))
    assert len(info.message) < MAX_MESSAGE_CHARS + 100 and info.message.startswith("x" * 1000)
    assert "49934464 characters cut by envfarm" in info.message
    assert len(info.traceback) < MAX_TRACEBACK_CHARS + 100
    assert (
        info.traceback.startswith("Traceback (most recent call last)") and "characters cut by envfarm" in info.traceback
    )
    frames = pack(m.make(m.ERROR, 1, error=info.to_data()))
    assert sum(len(f) for f in frames) < 200_000  # well under any socket's message limit
    exc = over_the_wire(raised(ValueError("x" * 50_000_000)))
    assert type(exc) is ValueError and str(exc).startswith("xxx")


def test_a_long_type_name_is_cut():
    cls = type("E" * 1000, (Exception,), {})
    info = ErrorInfo.from_exception(cls("boom"))
    assert len(info.type) < MAX_TYPE_CHARS + 100 and info.message == "boom"


def test_small_errors_are_unchanged():
    info = ErrorInfo.from_exception(raised(ValueError("boom")))
    assert info.message == "boom" and "cut by envfarm" not in info.traceback


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("x"),
        KeyError("it's"),
        KeyError(""),
        ValueError("v"),
        RuntimeError("'quoted'"),
        IndexError("list index out of range"),
    ],
    ids=repr,
)
def test_the_trainer_sees_the_message_the_env_raised(exc):
    again = over_the_wire(raised(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc)


def test_an_exception_whose_str_fails_still_becomes_data():
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RecursionError("maximum recursion depth exceeded")

    info = ErrorInfo.from_exception(raised(Unprintable()))
    assert info.message == "<str() of the exception failed: RecursionError>"
    assert info.type.endswith("Unprintable")
