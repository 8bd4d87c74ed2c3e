"""The guest's arm-smmu-v3 driver completes CMD_SYNC by polling the MSI in memory.

With IDR0.MSI and coherent access, Linux (ARM_SMMU_OPT_MSIPOLL) issues every
CMD_SYNC with CS=SIG_IRQ and its own queue slot as MSIAddress, and spins on
that word instead of reading CMDQ_CONS; the vSMMU writes the MSI into guest
RAM.  Under ``iommu.strict=1`` each unmap of a virtio-blk request is a TLBI
+ CMD_SYNC; the service's trace (``--trace``: one line per register access
and per command) counts the syncs and the CMDQ_CONS reads in a window of
disk reads.  GERROR and EVTQ stay wired: with the DT node's ``combined``
interrupt Linux never sets up MSIs for them (``arm_smmu_setup_msis`` runs only
for unique IRQs, and then needs an ``msi-parent``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qmp_harness.nested import BLK_MODULES, VIRTIO_BLK, NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.nested_fixtures import StartNested

pytestmark = pytest.mark.e2e

ARM_SMMU_FEAT_MSI = 1 << 7
"""Linux's driver feature bit for IDR0.MSI (drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h)."""
IMAGE_SIZE = 16 * 1024 * 1024
READ_BLOCK = 64 * 1024
READ_COUNT = 64
SYNC_LINE = re.compile(r"cmdq\[\d+\] SYNC\(cs=0x(\d)")
CONS_READ = re.compile(r"read  CMDQ_CONS/")


def trace_counts(nm: NestedMachine) -> tuple[dict[int, int], int]:
    """CMD_SYNCs by CS value, and CMDQ_CONS reads, in the service's trace so far."""
    syncs: dict[int, int] = {}
    cons_reads = 0
    for line in nm.service_log.read_text(errors="replace").splitlines():
        found = SYNC_LINE.search(line)
        if found:
            syncs[int(found.group(1))] = syncs.get(int(found.group(1)), 0) + 1
        elif CONS_READ.search(line):
            cons_reads += 1
    return syncs, cons_reads


async def test_strict_unmaps_complete_by_msi_without_reading_cmdq_cons(
    nested_machine: StartNested, tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    endpoint = NestedEndpoint(slot=2, kind=VIRTIO_BLK, image=image)
    nm = await nested_machine(NestedConfig(endpoints=(endpoint,), modules=BLK_MODULES,
                                           append=("iommu.strict=1",),
                                           service_args=("--trace",)))
    await nm.wait_endpoint_bound(endpoint)
    probe = await nm.dmesg("arm-smmu-v3.*features")
    found = re.search(r"features 0x([0-9a-f]+)", probe)
    assert found, probe
    assert int(found.group(1), 16) & ARM_SMMU_FEAT_MSI, probe
    # GERROR and EVTQ stay on the wired (combined) interrupt: the driver never programs
    # their MSI registers, and enables both interrupts in IRQ_CTRL.
    trace = nm.service_log.read_text(errors="replace")
    assert "IRQ_CFG" not in trace
    assert "write IRQ_CTRL/4 <- 0x5" in trace
    device = await nm.block_device(endpoint)

    syncs_before, cons_before = trace_counts(nm)
    msis_before = (await nm.service("query-vsmmu"))["cmdq"]["sync-msis"]
    await nm.sh(f"dd if={device} of=/dev/null bs={READ_BLOCK} count={READ_COUNT} iflag=direct "
                "2>/dev/null", timeout=120)
    syncs_after, cons_after = trace_counts(nm)
    msi_syncs = syncs_after.get(1, 0) - syncs_before.get(1, 0)
    other_syncs = sum(syncs_after.values()) - sum(syncs_before.values()) - msi_syncs
    cons_reads = cons_after - cons_before
    print(f"\n{READ_COUNT} O_DIRECT reads: {msi_syncs} CMD_SYNC(CS=SIG_IRQ), "
          f"{other_syncs} other syncs, {cons_reads} CMDQ_CONS reads")
    assert msi_syncs >= READ_COUNT, (syncs_before, syncs_after)  # one per strict unmap at least
    assert other_syncs == 0
    assert cons_reads == 0
    state = await nm.service("query-vsmmu")
    assert state["enabled"] and state["active-errors"] == [], state
    assert state["cmdq"]["sync-msis"] - msis_before >= msi_syncs  # QMP counts them too
