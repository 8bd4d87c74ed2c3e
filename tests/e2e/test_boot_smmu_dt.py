"""A custom DT with an arm,smmu-v3 node at the BAR of a QEMU test device (edu, slot 1).

The edu function's registers are not an SMMU, so the driver's probe must fail;
what we check is that the guest sees the node and the arm-smmu-v3 driver
tried to probe it -- the mechanism the vSMMU relies on (DESIGN.md section 5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_images.initramfs import InitFragment
from qmp_harness.devicetree import (
    SmmuV3Node,
    add_smmu_v3,
    dump_machine_dtb,
    virt_intx_spi,
    write_dtb,
)
from qmp_harness.fixtures import BootMachine, GuestEnvironment

pytestmark = pytest.mark.e2e

EDU_SLOT = 1
INTA = 1
EXPECTED_BAR = 0x1000_0000  # the first BAR in the 32-bit window (DESIGN.md section 5)


async def test_guest_sees_smmu_node_and_driver_probes_it(
    boot_machine: BootMachine, guest_env: GuestEnvironment, tmp_path: Path
) -> None:
    tree = dump_machine_dtb(guest_env.qemu, guest_env.machine_config())
    add_smmu_v3(tree, SmmuV3Node(base=EXPECTED_BAR, spi=virt_intx_spi(EDU_SLOT, INTA)))
    dtb = tmp_path / "smmu.dtb"
    dtb.write_bytes(write_dtb(tree))
    probe_log = InitFragment("smmu-dmesg", "dmesg | grep -i smmu > /tmp/smmu.log")
    vm = await boot_machine(
        devices=[f'{{"driver":"edu","addr":"{EDU_SLOT:#x}"}}'], dtb=dtb, fragments=[probe_log]
    )
    # The BAR is assigned but not decoded until the function is enabled.
    output, status = await vm.console.run(
        f"echo 1 > /sys/bus/pci/devices/0000:00:{EDU_SLOT:02x}.0/enable"
    )
    assert status == 0, output
    edu = next(d for d in await vm.query_pci() if d["slot"] == EDU_SLOT)
    assert edu["regions"][0]["address"] == EXPECTED_BAR, "guest put the BAR elsewhere"

    node = f"/proc/device-tree/smmuv3@{EXPECTED_BAR:x}"
    output, status = await vm.console.run(f"cat {node}/compatible")
    assert status == 0 and output.startswith("arm,smmu-v3"), output
    output, status = await vm.console.run(f"ls /sys/bus/platform/devices/ | grep {EXPECTED_BAR:x}")
    assert status == 0, output
    output, _ = await vm.console.run("cat /tmp/smmu.log")
    assert f"arm-smmu-v3 {EXPECTED_BAR:x}.smmuv3" in output, output
