"""Differential testing of our vSMMU against QEMU's SMMUv3 over qtest (DESIGN.md §11).

The same scenario programs both targets (:mod:`.targets`) and the DMA
outcomes and event records are compared; ``python -m
qmp_harness.differential --examples N`` runs the suite and prints the
summary.
"""
