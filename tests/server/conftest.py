"""The farms the server tests run on: brokers and workers on loopback (tests/farms.py)."""

from __future__ import annotations

import pytest
from farms import start_farm


@pytest.fixture
def farm():
    """Three 4-slot workers."""
    with start_farm(3, 4) as (broker, _):
        yield broker


@pytest.fixture
def quick_farm():
    """Two 2-slot workers, declared lost after 2.5 s of silence; yields (broker, worker processes)."""
    with start_farm(2, 2, dead_after=2.5) as farm:
        yield farm
