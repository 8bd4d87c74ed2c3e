"""Event queue records: event ids and formats.

Source: Arm IHI 0070 chapter 7 "Faults, errors and events", §7.3 "Event
records" (one subsection per event).  An event record is 32 bytes: four
little-endian 64-bit double words.  Every record starts with
``EventID[7:0]``, ``SSV[11]``, ``SubstreamID[31:12]``, ``StreamID[63:32]``;
translation-related records add STAG/Stall/PnU/InD/RnW/S2/CLASS in double
word 1, the input address in double word 2 and the IPA or the fetch address
in double word 3.

The fast path for producers is :data:`EVT` (field objects); the
documentation path is :func:`encode_event` / :func:`decode_event` and
:class:`Event`, which print by name.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping

from vsmmu.arch.fields import ArchError, Field, RecordLayout, bytes_from_words, words_from_bytes

logger = logging.getLogger(__name__)

EVENT_SIZE = 32


class EventId(enum.IntEnum):
    """Event record ids (IHI 0070 §7.3, table "Event records")."""

    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25


class EventClass(enum.IntEnum):
    """Event record CLASS: which access caused a translation fault (IHI 0070 §7.3.12)."""

    CD = 0
    TT = 1
    IN = 2


class EVT:
    """Event record fields, shared across the formats that use them (IHI 0070 §7.3)."""

    ID = Field("event_id", 7, 0)
    SSV = Field("ssv", 11, 11)
    SSID = Field("ssid", 31, 12)
    SID = Field("sid", 63, 32)
    STAG = Field("stag", 15, 0, word=1)
    STALL = Field("stall", 31, 31, word=1)
    PNU = Field("pnu", 33, 33, word=1)
    IND = Field("ind", 34, 34, word=1)
    RNW = Field("rnw", 35, 35, word=1)
    S2 = Field("s2", 39, 39, word=1)
    CLASS = Field("class", 41, 40, word=1)
    TT_READ = Field("tt_read", 44, 44, word=1)
    INPUT_ADDR = Field("input_addr", 63, 0, word=2)
    IPA = Field("ipa", 51, 12, word=3, address=True)
    FETCH_ADDR = Field("fetch_addr", 51, 3, word=3, address=True)


_HEAD = (EVT.ID, EVT.SSV, EVT.SSID, EVT.SID)
_ACCESS = (EVT.STAG, EVT.STALL, EVT.PNU, EVT.IND, EVT.RNW)
_WALK = (*_ACCESS, EVT.S2, EVT.CLASS, EVT.INPUT_ADDR)

EVENT_LAYOUTS: dict[EventId, RecordLayout] = {
    eid: RecordLayout(eid.name, EVENT_SIZE, [*_HEAD, *fields])
    for eid, fields in {
        EventId.F_UUT: (*_ACCESS, EVT.INPUT_ADDR),
        EventId.C_BAD_STREAMID: (),
        EventId.F_STE_FETCH: (EVT.FETCH_ADDR,),
        EventId.C_BAD_STE: (),
        EventId.F_BAD_ATS_TREQ: (EVT.PNU, EVT.IND, EVT.RNW, EVT.INPUT_ADDR),
        EventId.F_STREAM_DISABLED: (),
        EventId.F_TRANSL_FORBIDDEN: (EVT.RNW, EVT.INPUT_ADDR),
        EventId.C_BAD_SUBSTREAMID: (),
        EventId.F_CD_FETCH: (EVT.FETCH_ADDR,),
        EventId.C_BAD_CD: (),
        EventId.F_WALK_EABT: (*_WALK, EVT.FETCH_ADDR),
        EventId.F_TRANSLATION: (*_WALK, EVT.IPA),
        EventId.F_ADDR_SIZE: (*_WALK, EVT.IPA),
        EventId.F_ACCESS: (*_WALK, EVT.IPA),
        EventId.F_PERMISSION: (*_WALK, EVT.TT_READ, EVT.IPA),
        EventId.F_TLB_CONFLICT: (EVT.IND, EVT.RNW, EVT.S2, EVT.INPUT_ADDR),
        EventId.F_CFG_CONFLICT: (),
        EventId.E_PAGE_REQUEST: (),
        EventId.F_VMS_FETCH: (EVT.FETCH_ADDR,),
    }.items()
}
"""Per-event field tables: ``EVENT_LAYOUTS[id].decode(bytes)`` gives every field."""


def event_name(event_id: int) -> str:
    """The event's name, or ``UNKNOWN(0x..)``."""
    try:
        return EventId(event_id).name
    except ValueError:
        return f"UNKNOWN({event_id:#04x})"


@dataclasses.dataclass(frozen=True)
class Event:
    """A decoded event record: its id and every field of its format except the id."""

    event_id: int
    fields: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The event's name (``C_BAD_STE``) or ``UNKNOWN(0x..)``."""
        return event_name(self.event_id)

    @property
    def sid(self) -> int:
        """The StreamID of the record."""
        return self.fields.get("sid", 0)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v:#x}" for k, v in self.fields.items() if v)
        return f"{self.name}({args})"

    def encode(self) -> bytes:
        """Encode to 32 bytes. Raises ArchError for an unknown id or a field that does not fit."""
        return encode_event(self.event_id, **self.fields)


def decode_event(data: bytes | bytearray | memoryview) -> Event:
    """Decode 32 little-endian bytes. An unknown id keeps only the common header fields."""
    words = words_from_bytes(data, EVENT_SIZE // 8)
    event_id = EVT.ID.get(words[0])
    try:
        layout = EVENT_LAYOUTS[EventId(event_id)]
    except ValueError:
        return Event(event_id, {f.name: f.get(words[0]) for f in _HEAD[1:]})
    values = layout.decode_words(words)
    del values["event_id"]
    return Event(EventId(event_id), values)


def encode_event(event_id: int, **fields: int) -> bytes:
    """Encode an event record into 32 little-endian bytes.

    Raises ArchError for an unknown id, an unknown field name or a value that does not fit.
    """
    try:
        layout = EVENT_LAYOUTS[EventId(event_id)]
    except ValueError:
        raise ArchError(f"event id {event_id:#x} is not an SMMUv3 event") from None
    return bytes_from_words(layout.encode_words({"event_id": int(event_id), **fields}))
