"""Fixtures shared by the unit suites."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import pytest


def _count_open_fds() -> int:
    # Collect first: a socket or mmap dropped by an earlier test may be closed by the
    # garbage collector in the middle of a measurement and look like a "negative leak".
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def open_fds() -> Callable[[], int]:
    """A callable giving this process's open descriptor count, after a full GC pass."""
    return _count_open_fds
