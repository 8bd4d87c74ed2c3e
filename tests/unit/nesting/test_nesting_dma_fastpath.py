"""An endpoint's DMA through the translator's direct path equals the full transaction.

``NestingTranslator.dma_read``/``dma_write`` hand an access straight to the sim
when :meth:`NestingTranslator.transaction` would; everything else takes the
transaction.  Two identical rigs run the same guest configuration and the same
access, one with the direct path switched off: data, the refusal (its event
and reason), the guest's event queue and guest RAM must be the same.
"""

from __future__ import annotations

import pytest

from vsmmu.arch import Ste, SteConfig
from vsmmu.arch.registers import GBPA
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.nesting import NestingTranslator, StreamFault
from vsmmu.smmu import GuestRam, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
SID = 0x08
NOT_AN_ENDPOINT = 0x09
CD_TABLE = RAM_BASE + 0x8_0000
RESERVED_CONFIG = 0b001  # STE.Config 1-3 are reserved (IHI 0070 §5.2)
ADDRESSES = [RAM_BASE + 0x1000, RAM_BASE + RAM_SIZE + 0x1000, 0x10]


def rig(direct: bool, setup: str) -> tuple[NestingTranslator, GuestRam, GuestDriver]:
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    sim = SimIommufd()
    translator = NestingTranslator(sim)
    smmu = SmmuV3(ram, translator, SmmuFeatures())
    translator.bind(smmu)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    translator.add_endpoint(SID, sim.create_mock_device(SID, name="ep"), "ep")
    if not direct:
        translator._direct = lambda sid: None  # type: ignore[method-assign]
    ram.write(RAM_BASE + 0x1000, b"guest RAM bytes!")
    driver = GuestDriver(smmu, ram)
    driver.probe()
    if setup == "disabled-bypass":
        driver.update_gbpa(0, GBPA.ABORT.inplace_mask)
        return translator, ram, driver
    if setup == "disabled-abort":
        driver.update_gbpa(GBPA.ABORT.inplace_mask, 0)
        return translator, ram, driver
    driver.reset()
    if setup == "unpopulated":  # the level-1 descriptor of SID is empty: C_BAD_STREAMID
        return translator, ram, driver
    stes = {
        "bypass": Ste(v=1, config=SteConfig.BYPASS),
        "abort": Ste(v=1, config=SteConfig.ABORT),
        "invalid": Ste(v=0),
        "s1-no-cd": Ste(v=1, config=SteConfig.S1_TRANS, s1_context_ptr=CD_TABLE),
        "reserved-config": Ste(v=1, config=RESERVED_CONFIG),
        "s2-config": Ste(v=1, config=SteConfig.S2_TRANS),
    }
    driver.write_ste(SID, stes[setup])
    return translator, ram, driver


def outcome(translator: NestingTranslator, sid: int, iova: int,
            write: bool) -> tuple[object, ...]:
    try:
        if write:
            translator.dma_write(sid, iova, b"endpoint")
            return ("ok",)
        return ("ok", translator.dma_read(sid, iova, 8))
    except StreamFault as fault:
        result = fault.result
        return ("fault", result.ok, result.event, result.reason, result.write, result.iova)


@pytest.mark.parametrize("setup", ["bypass", "abort", "invalid", "s1-no-cd", "reserved-config",
                                   "s2-config", "unpopulated", "disabled-bypass", "disabled-abort"])
@pytest.mark.parametrize("iova", ADDRESSES)
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("sid", [SID, NOT_AN_ENDPOINT])
def test_direct_path_equals_transaction(setup: str, iova: int, write: bool, sid: int) -> None:
    seen = []
    for direct in (True, False):
        translator, ram, driver = rig(direct, setup)
        result = outcome(translator, sid, iova, write)
        seen.append((result, driver.read_events() if driver.smmu.enabled else None,
                     bytes(ram.data)))
    assert seen[0] == seen[1]


def views_outcome(translator: NestingTranslator, sid: int, iova: int,
                  write: bool) -> tuple[object, ...]:
    """``outcome`` through ``dma_views``: a write stores through the views."""
    try:
        views = translator.dma_views(sid, iova, 8, write)
    except StreamFault as fault:
        result = fault.result
        return ("fault", result.ok, result.event, result.reason, result.write, result.iova)
    if write:
        data = memoryview(b"endpoint")
        for view in views:
            view[:] = data[: len(view)]
            data = data[len(view):]
        return ("ok",)
    return ("ok", b"".join(bytes(view) for view in views))


@pytest.mark.parametrize("setup", ["bypass", "abort", "invalid", "s1-no-cd", "reserved-config",
                                   "s2-config", "unpopulated", "disabled-bypass", "disabled-abort"])
@pytest.mark.parametrize("iova", [*ADDRESSES, RAM_BASE + 0x1FFC])
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("sid", [SID, NOT_AN_ENDPOINT])
def test_zero_copy_views_equal_the_copying_path(setup: str, iova: int, write: bool,
                                                sid: int) -> None:
    # The zero-copy path (virtio-blk's data) must allow, refuse and report exactly as the
    # copying path does, guest events and guest RAM included, across a page boundary too.
    seen = []
    for zero_copy in (True, False):
        translator, ram, driver = rig(True, setup)
        judge = views_outcome if zero_copy else outcome
        result = judge(translator, sid, iova, write)
        seen.append((result, driver.read_events() if driver.smmu.enabled else None,
                     bytes(ram.data)))
    assert seen[0] == seen[1]
