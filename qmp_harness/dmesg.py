"""What the guest's arm-smmu-v3 driver prints about the events it reads, parsed.

Every kernel prints ``event 0x.. received:`` and the raw dwords
(:func:`guest_event_reports`); the 7.x drivers add a decoded line
(:func:`guest_decoded_events`).
"""

from __future__ import annotations

import dataclasses
import re

GUEST_EVENT_LINE = re.compile(r"arm-smmu-v3 \S+: event (0x[0-9a-f]+) received:\n"
                              r"((?:.*arm-smmu-v3 \S+: \s*0x[0-9a-f]{16}\n)+)")
GUEST_EVENT_DWORD = re.compile(r"\s(0x[0-9a-f]{16})$", re.MULTILINE)
DWORD_BYTES = 8


@dataclasses.dataclass(frozen=True)
class GuestEventReport:
    """One ``event 0x.. received:`` report of the guest's arm-smmu-v3 driver (raw dwords)."""

    event_id: int
    dwords: tuple[int, ...]

    def record(self) -> bytes:
        """The event record as the guest read it from its EVTQ (little-endian dwords)."""
        return b"".join(d.to_bytes(DWORD_BYTES, "little") for d in self.dwords)


def guest_event_reports(dmesg: str) -> list[GuestEventReport]:
    """Every event the guest driver printed, in order (every kernel prints the raw dwords)."""
    reports = []
    for match in GUEST_EVENT_LINE.finditer(dmesg):
        dwords = tuple(int(d, 16) for d in GUEST_EVENT_DWORD.findall(match.group(2)))
        reports.append(GuestEventReport(int(match.group(1), 16), dwords))
    return reports


GUEST_DECODED_EVENT = re.compile(
    r"arm-smmu-v3 \S+: event: (?P<name>\S+) client: (?P<client>.+?) "
    r"sid: (?P<sid>0x[0-9a-f]+) ssid: (?P<ssid>0x[0-9a-f]+)"
    r"(?: iova: (?P<iova>0x[0-9a-f]+) ipa: (?P<ipa>0x[0-9a-f]+))?"
    r"(?: fetch_addr: (?P<fetch_addr>0x[0-9a-f]+))?$", re.MULTILINE)
UNASSIGNED_CLIENT = "(unassigned sid)"
"""The client the driver names for a StreamID no device of its own has."""


@dataclasses.dataclass(frozen=True)
class GuestDecodedEvent:
    """One ``event: NAME client: … sid: …`` line of a newer arm-smmu-v3 driver.

    Linux 6.12 prints only the raw dwords (:class:`GuestEventReport`); the
    drivers of 7.x add this line after them.
    """

    name: str
    client: str
    """The device's name, or :data:`UNASSIGNED_CLIENT`."""
    sid: int
    ssid: int
    iova: int | None = None
    """Translation, address-size, access and permission faults only."""
    ipa: int | None = None
    fetch_addr: int | None = None
    """STE/CD/VMS fetch faults only."""


def guest_decoded_events(dmesg: str) -> list[GuestDecodedEvent]:
    """Every decoded event line the guest driver printed, in order (none on 6.12)."""
    def optional(match: re.Match[str], group: str) -> int | None:
        return None if match[group] is None else int(match[group], 16)

    return [
        GuestDecodedEvent(
            name=match["name"], client=match["client"], sid=int(match["sid"], 16),
            ssid=int(match["ssid"], 16), iova=optional(match, "iova"),
            ipa=optional(match, "ipa"), fetch_addr=optional(match, "fetch_addr"))
        for match in GUEST_DECODED_EVENT.finditer(dmesg)
    ]
