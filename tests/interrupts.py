"""Ctrl-C at a chosen point: a KeyboardInterrupt inside the next mailbox write of the channel."""

from __future__ import annotations

import pytest

from envfarm.transport import channel


def interrupt_the_next_mailbox_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next Mailbox.write raises KeyboardInterrupt between its two stores of `seq` (where it
    builds the header), as Ctrl-C may land there; the writes after it run as usual."""
    header = channel._header

    def interrupted(count: int):
        monkeypatch.setattr(channel, "_header", header)
        raise KeyboardInterrupt

    monkeypatch.setattr(channel, "_header", interrupted)
