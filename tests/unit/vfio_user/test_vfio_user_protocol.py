"""Every vfio-user command against the sample device, success and error paths."""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Callable

import pytest

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import ClientError, VfioUserClient
from vsmmu.vfio_user.dma import DmaMapping
from vsmmu.vfio_user.sample import (
    SAMPLE_BAR_SIZE,
    SAMPLE_IDENTITY,
    SAMPLE_MAGIC,
    SampleReg,
    ScratchDevice,
)
from vsmmu.vfio_user.server import VfioUserServer

BAR0 = uapi.PciRegion.BAR0
CONFIG = uapi.PciRegion.CONFIG
PAGE = uapi.DEFAULT_PGSIZE


async def expect_errno(expected: int, coro: object) -> None:
    with pytest.raises(ClientError) as info:
        await coro  # type: ignore[misc]
    assert info.value.errno == expected


def eventfd_value(fd: int) -> int:
    """Read an eventfd's counter (0 when nothing was signalled)."""
    readable, _, _ = select.select([fd], [], [], 0.2)
    if not readable:
        return 0
    return int.from_bytes(os.read(fd, 8), "little")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


# -- VERSION and information ------------------------------------------------


async def test_version_reply_carries_capabilities(client: VfioUserClient) -> None:
    caps = client.server_capabilities
    assert caps[uapi.CAP_MAX_XFER] == uapi.DEFAULT_MAX_XFER
    assert caps[uapi.CAP_MAX_FDS] == uapi.SERVER_MAX_FDS
    assert caps[uapi.CAP_WRITE_MULTIPLE] is True


async def test_second_version_is_refused(client: VfioUserClient) -> None:
    await expect_errno(errno.EINVAL, client.negotiate())


async def test_command_before_version_is_refused(server: VfioUserServer, socket_path: str) -> None:
    async with VfioUserClient() as early:
        await early.connect(socket_path)
        await expect_errno(errno.EINVAL, early.device_info())
        await early.negotiate()
        assert (await early.device_info())[1] == uapi.PCI_NUM_REGIONS


async def test_version_with_bad_json_is_refused(server: VfioUserServer, socket_path: str) -> None:
    async with VfioUserClient() as bad:
        await bad.connect(socket_path)
        body = uapi.VERSION_BODY.pack(0, 0) + b"{not json\0"
        await expect_errno(errno.EINVAL, bad.call(uapi.Command.VERSION, body))
        body = uapi.VERSION_BODY.pack(1, 0) + b"{}\0"
        await expect_errno(errno.ENOTSUP, bad.call(uapi.Command.VERSION, body))


async def test_device_info(client: VfioUserClient) -> None:
    flags, regions, irqs = await client.device_info()
    assert flags == uapi.DEVICE_FLAGS_PCI | uapi.DEVICE_FLAGS_RESET
    assert regions == uapi.PCI_NUM_REGIONS
    assert irqs == uapi.PCI_NUM_IRQS


async def test_region_info(client: VfioUserClient) -> None:
    bar0 = await client.region_info(BAR0)
    assert bar0.size == SAMPLE_BAR_SIZE
    assert bar0.flags == uapi.REGION_INFO_FLAG_READ | uapi.REGION_INFO_FLAG_WRITE
    assert (await client.region_info(CONFIG)).size == uapi.PCI_CFG_SPACE_EXP_SIZE
    absent = await client.region_info(uapi.PciRegion.BAR1)
    assert (absent.size, absent.flags) == (0, 0)
    await expect_errno(errno.EINVAL, client.region_info(uapi.PCI_NUM_REGIONS))


async def test_irq_info(client: VfioUserClient) -> None:
    intx = await client.irq_info(uapi.PciIrq.INTX)
    assert intx.count == 1
    assert intx.flags & uapi.IRQ_INFO_AUTOMASKED
    assert (await client.irq_info(uapi.PciIrq.MSIX)).count == 0
    await expect_errno(errno.EINVAL, client.irq_info(uapi.PCI_NUM_IRQS))


# -- regions -----------------------------------------------------------------


async def test_bar_read_write(client: VfioUserClient, sample: ScratchDevice) -> None:
    await client.region_write(BAR0, SampleReg.SCRATCH, u32(0xCAFE_F00D))
    assert await client.region_read(BAR0, SampleReg.SCRATCH, 4) == u32(0xCAFE_F00D)
    assert await client.region_read(BAR0, SampleReg.MAGIC, 4) == u32(SAMPLE_MAGIC)
    assert await client.region_read(BAR0, SampleReg.WRITE_COUNT, 4) == u32(1)
    assert sample.scratch == 0xCAFE_F00D


async def test_posted_writes_are_in_order_and_never_answered(
    client: VfioUserClient, sample: ScratchDevice
) -> None:
    for value in range(500):
        await client.region_write(BAR0, SampleReg.SCRATCH, u32(value), posted=True)
    # A raw request right after: the first reply on the wire must be its own.
    read = uapi.REGION_RW.pack(SampleReg.WRITE_COUNT, BAR0, 4)
    reply = await client.request(uapi.Command.REGION_READ, read)
    assert reply is not None and reply.payload[uapi.REGION_RW.size :] == u32(500)
    assert [value for _, value in sample.writes] == list(range(500))


async def test_posted_write_error_gets_no_reply(client: VfioUserClient) -> None:
    before = client._next_id
    await client.region_write(BAR0, SAMPLE_BAR_SIZE, u32(1), posted=True)
    reply = await client.request(uapi.Command.DEVICE_GET_INFO, uapi.DEVICE_INFO.pack(16, 0, 0, 0))
    assert reply is not None and reply.msg_id == before + 1
    assert not reply.flags & uapi.MsgFlag.ERROR


async def test_write_multi_in_order(client: VfioUserClient, sample: ScratchDevice) -> None:
    writes = [(int(BAR0), int(SampleReg.SCRATCH), u32(n)) for n in range(10)]
    await client.region_write_multi(writes)
    assert await client.region_read(BAR0, SampleReg.SCRATCH, 4) == u32(9)
    assert [value for _, value in sample.writes] == list(range(10))


async def test_region_errors(client: VfioUserClient) -> None:
    await expect_errno(errno.EINVAL, client.region_read(BAR0, SAMPLE_BAR_SIZE - 2, 4))
    await expect_errno(errno.EINVAL, client.region_read(uapi.PCI_NUM_REGIONS, 0, 4))
    await expect_errno(errno.EINVAL, client.region_read(uapi.PciRegion.BAR2, 0, 4))
    await expect_errno(errno.E2BIG, client.region_read(CONFIG, 0, uapi.DEFAULT_MAX_XFER + 1))
    short = uapi.REGION_RW.pack(0, BAR0, 4) + b"\x01\x02"
    await expect_errno(errno.EINVAL, client.call(uapi.Command.REGION_WRITE, short))
    await expect_errno(errno.EINVAL, client.call(uapi.Command.REGION_READ, b"\0" * 3))


async def test_handler_exception_is_eio(client: VfioUserClient, sample: ScratchDevice) -> None:
    def broken(offset: int, size: int) -> int:
        raise RuntimeError("device bug")

    sample.pci.bars[BAR0].read = broken
    await expect_errno(errno.EIO, client.region_read(BAR0, 0, 4))
    assert (await client.device_info())[1] == uapi.PCI_NUM_REGIONS


# -- config space ------------------------------------------------------------


async def test_config_space_identity_and_caps(client: VfioUserClient) -> None:
    header = await client.region_read(CONFIG, 0, uapi.PCI_STD_HEADER_END)
    assert int.from_bytes(header[0:2], "little") == SAMPLE_IDENTITY.vendor_id
    assert int.from_bytes(header[2:4], "little") == SAMPLE_IDENTITY.device_id
    assert int.from_bytes(header[9:12], "little") == SAMPLE_IDENTITY.class_code
    assert header[uapi.PCI_INTERRUPT_PIN] == uapi.PCI_INTERRUPT_PIN_INTA
    cap = header[uapi.PCI_CAPABILITY_LIST]
    assert (await client.region_read(CONFIG, cap, 1))[0] == uapi.PCI_CAP_ID_EXP
    assert await client.region_read(CONFIG, uapi.PCI_EXT_CAP_FIRST, 4) == u32(0)


async def test_config_bar_sizing_and_readonly(client: VfioUserClient) -> None:
    await client.region_write(CONFIG, uapi.PCI_BASE_ADDRESS_0, u32(0xFFFF_FFFF))
    sized = int.from_bytes(await client.region_read(CONFIG, uapi.PCI_BASE_ADDRESS_0, 4), "little")
    assert sized == (~(SAMPLE_BAR_SIZE - 1)) & 0xFFFF_FFFF
    await client.region_write(CONFIG, uapi.PCI_BASE_ADDRESS_0 + 4, u32(0xFFFF_FFFF))
    assert await client.region_read(CONFIG, uapi.PCI_BASE_ADDRESS_0 + 4, 4) == u32(0)
    await client.region_write(CONFIG, uapi.PCI_VENDOR_ID, u32(0))
    vendor = await client.region_read(CONFIG, uapi.PCI_VENDOR_ID, 2)
    assert int.from_bytes(vendor, "little") == SAMPLE_IDENTITY.vendor_id
    await client.region_write(CONFIG, uapi.PCI_COMMAND, (0xFFFF).to_bytes(2, "little"))
    command = int.from_bytes(await client.region_read(CONFIG, uapi.PCI_COMMAND, 2), "little")
    assert command == uapi.PCI_COMMAND_WRITABLE


async def test_reset(client: VfioUserClient, sample: ScratchDevice) -> None:
    await client.region_write(BAR0, SampleReg.SCRATCH, u32(7))
    await client.region_write(CONFIG, uapi.PCI_COMMAND, (2).to_bytes(2, "little"))
    await client.reset()
    assert sample.resets == 1
    assert await client.region_read(BAR0, SampleReg.SCRATCH, 4) == u32(0)
    assert await client.region_read(CONFIG, uapi.PCI_COMMAND, 2) == b"\0\0"


# -- interrupts --------------------------------------------------------------

TRIGGER_EVENTFD = uapi.IRQ_SET_DATA_EVENTFD | uapi.IRQ_SET_ACTION_TRIGGER
UNMASK = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_UNMASK


async def test_intx_eventfd_automask_and_level(client: VfioUserClient) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        await client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1, [fd])
        await client.region_write(BAR0, SampleReg.IRQ, u32(1))
        assert eventfd_value(fd) == 1
        # Automasked: a second assertion is not delivered until unmask...
        await client.region_write(BAR0, SampleReg.IRQ, u32(1))
        assert eventfd_value(fd) == 0
        # ...and a level still asserted at unmask is delivered again.
        await client.set_irqs(uapi.PciIrq.INTX, UNMASK, 0, 1)
        assert eventfd_value(fd) == 1
        await client.region_write(BAR0, SampleReg.IRQ, u32(0))
        await client.set_irqs(uapi.PciIrq.INTX, UNMASK, 0, 1)
        assert eventfd_value(fd) == 0
        # Guest mask holds a new assertion back until unmask.
        await client.set_irqs(
            uapi.PciIrq.INTX, uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_MASK, 0, 1
        )
        await client.region_write(BAR0, SampleReg.IRQ, u32(1))
        assert eventfd_value(fd) == 0
        await client.set_irqs(uapi.PciIrq.INTX, UNMASK, 0, 1)
        assert eventfd_value(fd) == 1
    finally:
        os.close(fd)


async def test_irq_disable_and_deassign(client: VfioUserClient, sample: ScratchDevice) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        await client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1, [fd])
        assert sample.pci.intx.eventfd is not None
        await client.set_irqs(
            uapi.PciIrq.INTX, uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_ACTION_TRIGGER
        )
        assert sample.pci.intx.eventfd is None
        await client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1, [fd])
        await client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1)  # no fd: de-assign
        assert sample.pci.intx.eventfd is None
    finally:
        os.close(fd)


async def test_set_irqs_errors_close_fds(
    open_fds: Callable[[], int], client: VfioUserClient
) -> None:
    before = open_fds()
    fds = [os.eventfd(0), os.eventfd(0)]
    try:
        both = uapi.IRQ_SET_DATA_NONE | uapi.IRQ_SET_DATA_BOOL | uapi.IRQ_SET_ACTION_TRIGGER
        await expect_errno(errno.EINVAL, client.set_irqs(uapi.PciIrq.INTX, both, 0, 1))
        await expect_errno(errno.EINVAL, client.set_irqs(uapi.PCI_NUM_IRQS, UNMASK, 0, 1))
        await expect_errno(errno.EINVAL, client.set_irqs(uapi.PciIrq.INTX, UNMASK, 0, 2))
        await expect_errno(errno.EINVAL, client.set_irqs(uapi.PciIrq.INTX, UNMASK | 0x100, 0, 1))
        await expect_errno(
            errno.EINVAL, client.set_irqs(uapi.PciIrq.INTX, TRIGGER_EVENTFD, 0, 1, fds)
        )
        await expect_errno(errno.EINVAL, client.set_irqs(uapi.PciIrq.INTX, UNMASK, 0, 1, fds[:1]))
    finally:
        for fd in fds:
            os.close(fd)
    assert open_fds() == before


# -- DMA -----------------------------------------------------------------------


async def test_dma_map_mmap_and_listeners(client: VfioUserClient, sample: ScratchDevice) -> None:
    mapped: list[DmaMapping] = []
    unmapped: list[DmaMapping] = []
    sample.pci.dma.add_listener(mapped.append, unmapped.append)
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 4 * PAGE)
        os.pwrite(memfd, b"pattern!", 2 * PAGE + 8)
        await client.dma_map(0x4000_0000, 2 * PAGE, memfd, offset=PAGE)
        dma = sample.pci.dma
        assert dma.read(0x4000_0000 + PAGE + 8, 8) == b"pattern!"
        dma.write(0x4000_0000, b"from-dev")
        assert os.pread(memfd, 8, PAGE) == b"from-dev"
        assert mapped[0].gpa == 0x4000_0000 and mapped[0].host_address is not None
        with pytest.raises(Exception, match="not inside one mapping"):
            dma.read(0x4000_0000 + 2 * PAGE - 4, 8)
        await client.dma_unmap(0x4000_0000, 2 * PAGE)
        assert unmapped == mapped and len(dma) == 0
    finally:
        os.close(memfd)


async def test_dma_map_errors(
    open_fds: Callable[[], int], client: VfioUserClient, sample: ScratchDevice
) -> None:
    before = open_fds()
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 4 * PAGE)
        await client.dma_map(0, 2 * PAGE, memfd)
        await expect_errno(errno.EEXIST, client.dma_map(PAGE, 2 * PAGE, memfd))
        await expect_errno(errno.EINVAL, client.dma_map(8 * PAGE, PAGE, memfd, flags=0x80))
        await expect_errno(errno.EINVAL, client.dma_map(8 * PAGE, 0, memfd))
        payload = uapi.DMA_MAP.pack(uapi.DMA_MAP.size, 3, 0, 8 * PAGE, PAGE)
        await expect_errno(errno.EINVAL, client.call(uapi.Command.DMA_MAP, payload, [memfd, memfd]))
        await expect_errno(errno.EINVAL, client.dma_unmap(0, PAGE))  # splits the mapping
        await expect_errno(errno.EINVAL, client.dma_unmap(0, PAGE, flags=uapi.DMA_UNMAP_ALL))
        await expect_errno(
            errno.EINVAL, client.dma_unmap(0, PAGE, flags=uapi.DMA_UNMAP_GET_DIRTY_BITMAP)
        )
        await client.dma_map(4 * PAGE, PAGE, memfd)
        await client.dma_unmap(0, 0, flags=uapi.DMA_UNMAP_ALL)
        assert len(sample.pci.dma) == 0
    finally:
        os.close(memfd)
    assert open_fds() == before


async def test_dma_without_fd_uses_messages(
    server: VfioUserServer, socket_path: str, sample: ScratchDevice
) -> None:
    memory = bytearray(4 * PAGE)
    requests: list[tuple[str, int, int]] = []

    def read(gpa: int, size: int) -> bytes:
        requests.append(("read", gpa, size))
        return bytes(memory[gpa - 0x10000 : gpa - 0x10000 + size])

    def write(gpa: int, data: bytes) -> None:
        requests.append(("write", gpa, len(data)))
        memory[gpa - 0x10000 : gpa - 0x10000 + len(data)] = data

    async with VfioUserClient(dma_read=read, dma_write=write) as qemu_like:
        await qemu_like.connect(socket_path)
        await qemu_like.negotiate()
        await qemu_like.dma_map(0x10000, 4 * PAGE)
        await server.dma_write(0x10010, b"hello")
        assert memory[0x10:0x15] == b"hello"
        assert await server.dma_read(0x1000E, 9) == b"\0\0hello\0\0"
        assert requests == [("write", 0x10010, 5), ("read", 0x1000E, 9)]
        with pytest.raises(Exception, match="not inside one mapping"):
            await server.dma_read(0x90000, 4)


# -- malformed traffic ---------------------------------------------------------


async def test_unknown_and_client_side_commands(client: VfioUserClient) -> None:
    await expect_errno(errno.ENOSYS, client.call(99))
    await expect_errno(errno.EINVAL, client.call(uapi.Command.DMA_READ, uapi.DMA_RW.pack(0, 4)))
    await expect_errno(errno.ENOTSUP, client.call(uapi.Command.DEVICE_GET_REGION_IO_FDS))
    assert (await client.device_info())[2] == uapi.PCI_NUM_IRQS


async def test_unexpected_fds_are_closed(
    open_fds: Callable[[], int], client: VfioUserClient
) -> None:
    before = open_fds()
    read, write = os.pipe()
    try:
        payload = uapi.DEVICE_INFO.pack(16, 0, 0, 0)
        await expect_errno(
            errno.EINVAL, client.call(uapi.Command.DEVICE_GET_INFO, payload, [read, write])
        )
    finally:
        os.close(read)
        os.close(write)
    assert open_fds() == before


async def test_unknown_header_flags(client: VfioUserClient) -> None:
    reply = await client.request(uapi.Command.DEVICE_RESET, flags=0x40)
    assert reply is not None and reply.flags & uapi.MsgFlag.ERROR
    assert reply.error == errno.EINVAL


@pytest.mark.parametrize("size", [4, uapi.DEFAULT_MAX_XFER + uapi.MAX_FIXED_PART + 1])
async def test_impossible_size_disconnects_and_next_client_works(
    server: VfioUserServer, socket_path: str, sample: ScratchDevice, size: int
) -> None:
    async with VfioUserClient() as bad:
        await bad.connect(socket_path)
        await bad.negotiate()
        await bad.send_raw(uapi.HEADER.pack(1, uapi.Command.DEVICE_RESET, size, 0, 0))
        await asyncio.wait_for(server.wait_disconnected(), 5)
        with pytest.raises(Exception):  # noqa: B017 - any failure: the server hung up
            await bad.device_info()
    assert sample.disconnects == 1
    async with VfioUserClient() as good:
        await good.connect(socket_path)
        await good.negotiate()
        assert (await good.device_info())[1] == uapi.PCI_NUM_REGIONS
