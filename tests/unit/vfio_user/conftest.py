"""Fixtures for the vfio-user unit tests: a sample device served on a socket."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from vsmmu.vfio_user.client import VfioUserClient
from vsmmu.vfio_user.sample import ScratchDevice
from vsmmu.vfio_user.server import VfioUserServer


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A short unix socket path (pytest's tmp_path can exceed sun_path)."""
    directory = tempfile.mkdtemp(prefix="vfu-", dir="/tmp")
    path = os.path.join(directory, "dev.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(directory)


@pytest.fixture
def sample() -> ScratchDevice:
    """The sample device model."""
    return ScratchDevice()


@pytest.fixture
async def server(sample: ScratchDevice, socket_path: str) -> AsyncIterator[VfioUserServer]:
    """The sample device served on ``socket_path``."""
    async with VfioUserServer(sample.pci, socket_path) as running:
        yield running


@pytest.fixture
async def client(server: VfioUserServer, socket_path: str) -> AsyncIterator[VfioUserClient]:
    """A client that connected and negotiated VERSION."""
    async with VfioUserClient() as connected:
        await connected.connect(socket_path)
        await connected.negotiate()
        yield connected
