"""Which suite the guest's pieces come from, and the kernel matrix's suites."""

from __future__ import annotations

from guest_images.debian import SUITES
from guest_images.kernel import DEFAULT_SUITE, NEWER_SUITE, userland_suite


def test_backports_kernel_takes_busybox_from_its_base_suite() -> None:
    # trixie-backports carries no busybox-static: apt refuses it from that suite.
    assert userland_suite("trixie-backports") == "trixie"
    assert userland_suite("sid") == "sid"
    assert userland_suite(DEFAULT_SUITE) == DEFAULT_SUITE


def test_matrix_suites_are_ones_the_private_apt_root_knows() -> None:
    assert {DEFAULT_SUITE, NEWER_SUITE, userland_suite(NEWER_SUITE)} <= set(SUITES)
    assert NEWER_SUITE != DEFAULT_SUITE
