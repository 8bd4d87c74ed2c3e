"""SMMUv3 architecture as data: registers, STE/CD, commands, events, page tables.

No state and no I/O: every architectural field is declared once, in the
spec's own names (Arm IHI 0070 for the SMMU, DDI 0487 for descriptors), as a
:class:`~vsmmu.arch.fields.Field` with a precomputed shift and mask.  Nothing
outside this package shifts or masks an architectural field.

Submodules:

* :mod:`~vsmmu.arch.fields` — ``Field``, ``RecordLayout``, ``ArchError``.
* :mod:`~vsmmu.arch.registers` — ``Reg`` offsets (page 0 and page 1), one
  field namespace per register (``CR0.SMMUEN``, ``GERROR.CMDQ_ERR``...),
  ``QueueIndex`` wrap arithmetic, ``RESET_VALUES``.
* :mod:`~vsmmu.arch.ste` — ``STE`` fields, ``Ste`` (decode/encode),
  ``SteConfig``, ``L1STD``/``L1Std``.
* :mod:`~vsmmu.arch.cd` — ``CD`` fields, ``Cd``, ``L1CD``/``L1Cd``, ``Tg0``.
* :mod:`~vsmmu.arch.commands` — ``CmdOpcode``, ``CError``, ``CMD`` fields
  (fast path), ``Command``, ``decode_command``/``encode_command``.
* :mod:`~vsmmu.arch.events` — ``EventId``, ``EVT`` fields, ``Event``,
  ``decode_event``/``encode_event``.
* :mod:`~vsmmu.arch.pagetables` — ``Granule`` (4K/16K/64K), ``DESC``,
  ``classify``, ``output_address``, ``encode_table/page/block``.
"""

from vsmmu.arch.cd import CD, L1CD, Cd, L1Cd, Tg0, Tg1
from vsmmu.arch.commands import (
    CMD,
    CError,
    CmdOpcode,
    Command,
    SyncCs,
    decode_command,
    decode_command_words,
    encode_cfgi_all,
    encode_command,
    encode_command_words,
)
from vsmmu.arch.events import EVT, Event, EventClass, EventId, decode_event, encode_event
from vsmmu.arch.fields import ArchError, Field, RecordLayout
from vsmmu.arch.pagetables import (
    DESC,
    GRANULE_4K,
    GRANULE_16K,
    GRANULE_64K,
    DescriptorKind,
    Granule,
    classify,
    encode_block,
    encode_page,
    encode_table,
    output_address,
)
from vsmmu.arch.registers import QueueIndex, Reg
from vsmmu.arch.ste import L1STD, STE, Eats, L1Std, S1Fmt, Ste, SteConfig, Strw

__all__ = [
    "CD", "CMD", "DESC", "EVT", "GRANULE_4K", "GRANULE_16K", "GRANULE_64K", "L1CD", "L1STD",
    "STE", "ArchError", "CError", "Cd", "CmdOpcode", "Command", "DescriptorKind", "Eats",
    "Event", "EventClass", "EventId", "Field", "Granule", "L1Cd", "L1Std", "QueueIndex",
    "RecordLayout", "Reg", "S1Fmt", "Ste", "SteConfig", "Strw", "SyncCs", "Tg0", "Tg1",
    "classify", "decode_command", "decode_command_words", "decode_event", "encode_block",
    "encode_cfgi_all", "encode_command", "encode_command_words", "encode_event", "encode_page",
    "encode_table", "output_address",
]
