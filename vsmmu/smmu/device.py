"""The vSMMUv3 device: register file, command queue, event queue, GERROR, IRQ.

One :class:`SmmuV3` is one SMMU.  It is driven from two sides:

* the guest, through :meth:`SmmuV3.read` / :meth:`SmmuV3.write` on the
  128 KiB register space (page 0 + page 1; 4- and 8-byte aligned accesses;
  anything else, and unknown offsets, read as zero and ignore writes with a
  log line);
* the translator, through :meth:`SmmuV3.lookup_ste`, :meth:`SmmuV3.lookup_cd`,
  :meth:`SmmuV3.record_event` and :meth:`SmmuV3.signal_event_overflow`.

Everything happens synchronously inside those calls: a CR0 write is
acknowledged in CR0ACK at once, a CMDQ_PROD write consumes the queue before
it returns, so a guest polling CMDQ_CONS after CMD_SYNC sees it done.

Behaviour (Arm IHI 0070; choices where the architecture leaves one):

* Command queue (§3.5, §4, §7.1): consumed on CMDQ_PROD writes, when CMDQEN
  is set, and when GERRORN acknowledges CMDQ_ERR.  An unknown opcode, a
  command for a feature not advertised (stage 2, EL2, EL3, PRI, ATS when
  off, VMS), SSec=1, CMD_SYNC with a reserved CS, or a sink refusal is
  CERROR_ILL; a fetch outside guest RAM is CERROR_ABT.  On error CONS
  points at the failing command, CONS.ERR holds the code, GERROR.CMDQ_ERR
  toggles and the queue stays frozen until GERRORN acknowledges it.
  PREFETCH_*, RESUME and STALL_TERM are accepted as no-ops (nothing is
  cached, nothing stalls).  CMD_SYNC with CS=SIG_IRQ, when IDR0.MSI is
  advertised, completes with its MSI: the 32-bit MSIData stored at
  MSIAddress in guest RAM (coherent, so Linux polls that word instead of
  reading CMDQ_CONS), stored when the PROD write's consumption ends (after
  the observer saw the commands); a store outside guest RAM raises
  GERROR.MSI_CMDQ_ABT_ERR and the queue goes on.  Without IDR0.MSI, CS=IRQ
  is treated as CS=NONE; CS=SEV needs no action.  CFGI_STE for a SID at
  or above 2**SIDSIZE is a no-op.
* Event queue (§3.5.3, §7.2): written only while CR0.EVENTQEN; when full
  the record is lost and EVENTQ_PROD.OVFLG toggles to differ from
  EVENTQ_CONS.OVACKFLG (once per overflow); a write outside guest RAM
  raises GERROR.EVENTQ_ABT_ERR and records are dropped while it is active.
* Combined wired IRQ, level-sensitive: high while (IRQ_CTRL.EVENTQ_IRQEN
  and the event queue is non-empty) or (IRQ_CTRL.GERROR_IRQEN and an error
  is active).  GERROR and EVTQ interrupts are only wired: with IDR0.MSI
  their IRQ_CFG0-2 registers hold what the guest writes, but no MSI is
  sent through them (Linux sets up those MSIs only for an SMMU with unique
  IRQs and an ``msi-parent``; ours has the ``combined`` wired IRQ).
  Without IDR0.MSI they read as zero.
* Base registers are ignored while their unit is enabled (STRTAB_* while
  SMMUEN, CMDQ_BASE while CMDQEN, EVENTQ_BASE while EVENTQEN), as are
  CMDQ_CONS while CMDQEN and EVENTQ_PROD while EVENTQEN.  GBPA writes
  without UPDATE are ignored; with UPDATE they complete at once.
  PRIQ registers read as zero (PRI is not advertised).

Trace mode (``trace=True``) logs every register access and every command by
name, one line each, on this module's logger at INFO.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct

from vsmmu.arch.commands import (
    CFGI_ALL_RANGE,
    CMD,
    COMMAND_SIZE,
    CError,
    CmdOpcode,
    Command,
    SyncCs,
    cfgi_ste_range_sids,
    decode_command,
    decode_command_words,
)
from vsmmu.arch.events import EVENT_SIZE, Event
from vsmmu.arch.fields import Field
from vsmmu.arch.registers import (
    CMDQ_CONS,
    CR0,
    CR1,
    CR2,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GBPA,
    GERROR,
    IRQ_CFG0,
    IRQ_CFG2,
    IRQ_CTRL,
    QUEUE_BASE,
    RESET_VALUES,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    QueueIndex,
    Reg,
)
from vsmmu.arch.ste import STE_SIZE, id_fits
from vsmmu.smmu.cmdq import (
    KIND_KEY_MASK,
    CommandErrorHandler,
    CommandKind,
    command_kinds,
    fetch_commands,
)
from vsmmu.smmu.features import SmmuFeatures
from vsmmu.smmu.interfaces import (
    ConfigSink,
    GbpaState,
    GuestMemory,
    GuestMemoryError,
    IrqLine,
    NullConfigSink,
    QueuedCommand,
    SmmuError,
    StreamTableConfig,
)
from vsmmu.smmu.observer import SmmuObserver
from vsmmu.smmu.regfile import WORD_BYTES, WORD_MASK, RegisterFile, constant
from vsmmu.smmu.streamtable import (
    CdLookup,
    SteClassCache,
    SteLookup,
    SteStatus,
    locate_ste,
    lookup_cd,
    stream_table_config,
)

logger = logging.getLogger(__name__)

_COMMAND_WORDS = struct.Struct("<QQ")

# Plain ints for the command loop (an enum member read through its class is slow).
_BATCH, _CFGI_STE, _CFGI_STE_RANGE, _SYNC, _NOP = (int(kind) for kind in CommandKind)
_OPCODE_MASK = CMD.OPCODE.inplace_mask
_OPCODES: dict[int, CmdOpcode] = {int(op): op for op in CmdOpcode}
_SYNC_CS_VALUES = frozenset(int(cs) for cs in SyncCs)
_CERROR_NONE = CError.NONE
_tuple_new = tuple.__new__
"""Builds a QueuedCommand without NamedTuple's Python-level ``__new__`` (one per command)."""


class SmmuV3(RegisterFile):
    """A virtual SMMUv3 (see the module docstring for its behaviour).

    ``memory`` is guest RAM, ``sink`` receives configuration changes,
    ``irq`` is the combined wired interrupt line (one is created if omitted).
    """

    def __init__(self, memory: GuestMemory, sink: ConfigSink | None = None,
                 features: SmmuFeatures | None = None, irq: IrqLine | None = None,
                 *, trace: bool = False, name: str = "smmuv3",
                 on_command_error: CommandErrorHandler | None = None) -> None:
        super().__init__(name, trace)
        self.memory = memory
        self.sink: ConfigSink = sink if sink is not None else NullConfigSink()
        self.features = features if features is not None else SmmuFeatures()
        self.irq = irq if irq is not None else IrqLine(f"{name}-combined")
        self.id_registers = self.features.id_registers()
        self.commands_consumed = 0
        """Commands consumed since creation (for benchmarks and QMP statistics)."""
        self.sync_msis = 0
        """CMD_SYNC completion MSIs written (or attempted) since creation."""
        self._msis: list[tuple[int, int]] = []
        self.on_command_error = on_command_error
        """Told (error, queue index, command or None) each time the command queue stops."""
        self.observer: SmmuObserver | None = None
        """Told of each consume and each event lost to a full queue (the sanitizer)."""
        self._kinds = command_kinds(self.features)
        self._cmdq_pointer_mask = QueueIndex(self.features.cmdqs).pointer_mask
        self._evtq_pointer_mask = QueueIndex(self.features.evtqs).pointer_mask
        self._stream_table: StreamTableConfig | None = None
        self._ste_cache = SteClassCache()
        self._stream_table_key = (-1, -1)
        self._build_register_table()
        self._set_reset_values()

    # ------------------------------------------------------------------ setup

    def _set_reset_values(self) -> None:
        self.cr0 = RESET_VALUES[Reg.CR0]
        self.cr1 = RESET_VALUES[Reg.CR1]
        self.cr2 = RESET_VALUES[Reg.CR2]
        self.gbpa = RESET_VALUES[Reg.GBPA]
        self.irq_ctrl = RESET_VALUES[Reg.IRQ_CTRL]
        self.gerror = RESET_VALUES[Reg.GERROR]
        self.gerrorn = RESET_VALUES[Reg.GERRORN]
        self.strtab_base = RESET_VALUES[Reg.STRTAB_BASE]
        self.strtab_base_cfg = RESET_VALUES[Reg.STRTAB_BASE_CFG]
        self.cmdq_base = RESET_VALUES[Reg.CMDQ_BASE]
        self.cmdq_prod = RESET_VALUES[Reg.CMDQ_PROD]
        self.cmdq_cons = RESET_VALUES[Reg.CMDQ_CONS]
        self.evtq_base = RESET_VALUES[Reg.EVENTQ_BASE]
        self.evtq_prod = RESET_VALUES[Reg.EVENTQ_PROD]
        self.evtq_cons = RESET_VALUES[Reg.EVENTQ_CONS]
        self.msi_config: dict[int, int] = {}
        """GERROR/EVENTQ_IRQ_CFG0-2 by offset (stored only; those interrupts are wired)."""

    def _build_register_table(self) -> None:
        for reg, value in self.id_registers.items():
            self._readers[reg] = constant(value)
        plain = {Reg.CR0: "cr0", Reg.CR0ACK: "cr0", Reg.CR1: "cr1", Reg.CR2: "cr2",
                 Reg.GBPA: "gbpa", Reg.IRQ_CTRL: "irq_ctrl", Reg.IRQ_CTRLACK: "irq_ctrl",
                 Reg.GERROR: "gerror", Reg.GERRORN: "gerrorn", Reg.STRTAB_BASE: "strtab_base",
                 Reg.STRTAB_BASE_CFG: "strtab_base_cfg", Reg.CMDQ_BASE: "cmdq_base",
                 Reg.CMDQ_PROD: "cmdq_prod", Reg.CMDQ_CONS: "cmdq_cons",
                 Reg.EVENTQ_BASE: "evtq_base", Reg.EVENTQ_PROD: "evtq_prod",
                 Reg.EVENTQ_CONS: "evtq_cons"}
        for reg, attr in plain.items():
            self._readers[reg] = self._attribute_reader(attr)
        msi_config = {Reg.GERROR_IRQ_CFG0: IRQ_CFG0.ADDR.inplace_mask,
                      Reg.GERROR_IRQ_CFG1: WORD_MASK, Reg.GERROR_IRQ_CFG2: IRQ_CFG2.WRITABLE,
                      Reg.EVENTQ_IRQ_CFG0: IRQ_CFG0.ADDR.inplace_mask,
                      Reg.EVENTQ_IRQ_CFG1: WORD_MASK, Reg.EVENTQ_IRQ_CFG2: IRQ_CFG2.WRITABLE}
        for reg in (Reg.STATUSR, Reg.AGBPA, *msi_config, Reg.PRIQ_BASE, Reg.PRIQ_IRQ_CFG0,
                    Reg.PRIQ_IRQ_CFG1, Reg.PRIQ_IRQ_CFG2, Reg.PRIQ_PROD, Reg.PRIQ_CONS):
            self._readers[reg] = lambda: 0
        if self.features.msi:
            for reg, writable in msi_config.items():
                self._readers[reg] = functools.partial(self._read_msi_config, reg)
                self._writers[reg] = functools.partial(self._write_msi_config, reg, writable)
        self._writers.update({
            Reg.CR0: self._write_cr0, Reg.CR1: self._write_cr1, Reg.CR2: self._write_cr2,
            Reg.GBPA: self._write_gbpa, Reg.IRQ_CTRL: self._write_irq_ctrl,
            Reg.GERRORN: self._write_gerrorn, Reg.STRTAB_BASE: self._write_strtab_base,
            Reg.STRTAB_BASE_CFG: self._write_strtab_base_cfg,
            Reg.CMDQ_BASE: self._write_cmdq_base, Reg.CMDQ_PROD: self._write_cmdq_prod,
            Reg.CMDQ_CONS: self._write_cmdq_cons, Reg.EVENTQ_BASE: self._write_evtq_base,
            Reg.EVENTQ_PROD: self._write_evtq_prod, Reg.EVENTQ_CONS: self._write_evtq_cons,
        })

    # ------------------------------------------------------------------- reset

    def reset(self) -> None:
        """Device reset: every register to its reset value, IRQ low, sink told."""
        self._set_reset_values()
        self.irq.set_level(False)
        logger.info("%s: reset", self.name)
        self.sink.reset()
        if self.observer is not None:
            self.observer.reset()

    # -------------------------------------------------------- register writes

    def _read_msi_config(self, reg: Reg) -> int:
        return self.msi_config.get(reg, 0)

    def _write_msi_config(self, reg: Reg, writable: int, value: int) -> None:
        self.msi_config[reg] = value & writable

    def _write_cr0(self, value: int) -> None:
        old = self.cr0
        self.cr0 = value & CR0.WRITABLE
        changed = old ^ self.cr0
        if CR0.SMMUEN.test(changed):
            enabled = CR0.SMMUEN.test(self.cr0)
            logger.info("%s: SMMUEN=%d", self.name, enabled)
            self.sink.smmu_enable_changed(enabled, self.stream_table())
        if CR0.CMDQEN.test(changed) and CR0.CMDQEN.test(self.cr0):
            self._consume_cmdq()
        self._update_irq()

    def _write_cr1(self, value: int) -> None:
        self.cr1 = value & CR1.WRITABLE

    def _write_cr2(self, value: int) -> None:
        self.cr2 = value & CR2.WRITABLE

    def _write_gbpa(self, value: int) -> None:
        if not GBPA.UPDATE.test(value):
            logger.info("%s: GBPA write %#x without UPDATE ignored", self.name, value)
            return
        self.gbpa = value & GBPA.WRITABLE
        self.sink.gbpa_changed(self.gbpa_state())

    def _write_irq_ctrl(self, value: int) -> None:
        self.irq_ctrl = value & IRQ_CTRL.WRITABLE
        self._update_irq()

    def _write_gerrorn(self, value: int) -> None:
        was_stopped = self._cmdq_error_active()
        self.gerrorn = value & GERROR.WRITABLE
        if was_stopped and not self._cmdq_error_active():
            logger.info("%s: CMDQ_ERR acknowledged, resuming at CONS=%#x", self.name,
                        self.cmdq_cons)
            self._consume_cmdq()
        self._update_irq()

    def _write_strtab_base(self, value: int) -> None:
        if self._ignore_while(CR0.SMMUEN, "STRTAB_BASE", value):
            return
        self.strtab_base = value & STRTAB_BASE.WRITABLE

    def _write_strtab_base_cfg(self, value: int) -> None:
        if self._ignore_while(CR0.SMMUEN, "STRTAB_BASE_CFG", value):
            return
        self.strtab_base_cfg = value & STRTAB_BASE_CFG.WRITABLE

    def _write_cmdq_base(self, value: int) -> None:
        if self._ignore_while(CR0.CMDQEN, "CMDQ_BASE", value):
            return
        self.cmdq_base = value & QUEUE_BASE.WRITABLE

    def _write_cmdq_prod(self, value: int) -> None:
        self.cmdq_prod = value & self._cmdq_pointer_mask
        self._consume_cmdq()

    def _write_cmdq_cons(self, value: int) -> None:
        if self._ignore_while(CR0.CMDQEN, "CMDQ_CONS", value):
            return
        self.cmdq_cons = (self.cmdq_cons & CMDQ_CONS.ERR.inplace_mask) | (
            value & self._cmdq_pointer_mask)

    def _write_evtq_base(self, value: int) -> None:
        if self._ignore_while(CR0.EVENTQEN, "EVENTQ_BASE", value):
            return
        self.evtq_base = value & QUEUE_BASE.WRITABLE

    def _write_evtq_prod(self, value: int) -> None:
        if self._ignore_while(CR0.EVENTQEN, "EVENTQ_PROD", value):
            return
        self.evtq_prod = value & (self._evtq_pointer_mask | EVENTQ_PROD.OVFLG.inplace_mask)
        self._update_irq()

    def _write_evtq_cons(self, value: int) -> None:
        self.evtq_cons = value & (self._evtq_pointer_mask | EVENTQ_CONS.OVACKFLG.inplace_mask)
        self._update_irq()

    def _ignore_while(self, enable: Field, name: str, value: int) -> bool:
        if enable.test(self.cr0):
            logger.warning("%s: write %#x to %s ignored while its unit is enabled",
                           self.name, value, name)
            return True
        return False

    # ------------------------------------------------------------- state views

    def stream_table(self) -> StreamTableConfig:
        """The stream table configuration in force (clamped to the advertised features)."""
        key = (self.strtab_base, self.strtab_base_cfg)
        if key != self._stream_table_key or self._stream_table is None:
            # Built once per register change: every CFGI_STE asks for it.
            self._stream_table = stream_table_config(
                self.features, STRTAB_BASE.ADDR.get(self.strtab_base),
                STRTAB_BASE_CFG.FMT.get(self.strtab_base_cfg),
                STRTAB_BASE_CFG.LOG2SIZE.get(self.strtab_base_cfg),
                STRTAB_BASE_CFG.SPLIT.get(self.strtab_base_cfg))
            self._stream_table_key = key
        return self._stream_table

    def gbpa_state(self) -> GbpaState:
        """The global bypass attributes in force."""
        return GbpaState(abort=GBPA.ABORT.test(self.gbpa), raw=self.gbpa)

    @property
    def enabled(self) -> bool:
        """Whether CR0.SMMUEN is set."""
        return CR0.SMMUEN.test(self.cr0)

    def active_errors(self) -> int:
        """GERROR bits that are active (differ from GERRORN)."""
        return (self.gerror ^ self.gerrorn) & GERROR.WRITABLE

    def cmdq_error(self) -> CError:
        """CMDQ_CONS.ERR as a CERROR code (meaningful while CMDQ_ERR is active)."""
        code = CMDQ_CONS.ERR.get(self.cmdq_cons)
        try:
            return CError(code)
        except ValueError:
            return CError.NONE

    def _cmdq_error_active(self) -> bool:
        return GERROR.CMDQ_ERR.test(self.gerror ^ self.gerrorn)

    def _raise_gerror(self, error: Field) -> None:
        mask = error.inplace_mask
        if (self.gerror ^ self.gerrorn) & mask:
            return
        self.gerror ^= mask
        logger.info("%s: GERROR %s raised (GERROR=%#x GERRORN=%#x)", self.name,
                    error.name, self.gerror, self.gerrorn)
        self._update_irq()

    def _update_irq(self) -> None:
        level = False
        if IRQ_CTRL.GERROR_IRQEN.test(self.irq_ctrl) and self.active_errors():
            level = True
        elif IRQ_CTRL.EVENTQ_IRQEN.test(self.irq_ctrl) and CR0.EVENTQEN.test(self.cr0):
            q = self.evtq_index()
            level = not q.is_empty(q.pointer(self.evtq_prod), q.pointer(self.evtq_cons))
        self.irq.set_level(level)

    # ----------------------------------------------------------- command queue

    def cmdq_index(self) -> QueueIndex:
        """Index arithmetic of the command queue as CMDQ_BASE sizes it (clamped to IDR1)."""
        return QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(self.cmdq_base), self.features.cmdqs))

    def evtq_index(self) -> QueueIndex:
        """Index arithmetic of the event queue as EVENTQ_BASE sizes it (clamped to IDR1)."""
        return QueueIndex(min(QUEUE_BASE.LOG2SIZE.get(self.evtq_base), self.features.evtqs))

    def _consume_cmdq(self) -> None:
        if not CR0.CMDQEN.test(self.cr0) or self._cmdq_error_active():
            return
        q = self.cmdq_index()
        pointer_mask = q.pointer_mask
        prod = q.pointer(self.cmdq_prod)
        cons = q.pointer(self.cmdq_cons)
        pending = min(q.used(prod, cons), q.size)
        base = QUEUE_BASE.ADDR.get(self.cmdq_base)
        # The batch holds raw QueuedCommands; their CONS pointers follow from the first one.
        batch: list[QueuedCommand] = []
        batch_start = cons
        error = _CERROR_NONE
        kinds = self._kinds
        trace = self.trace
        while pending and error is _CERROR_NONE:
            index = q.index(cons)
            count = min(pending, q.size - index)
            chunk = fetch_commands(self.memory, base + index * COMMAND_SIZE, count, self.name)
            for dw0, dw1 in _COMMAND_WORDS.iter_unpack(chunk):
                # Keyed by opcode and SSEC: SSec=1 on a command that has it is absent (ILL).
                kind = kinds.get(dw0 & KIND_KEY_MASK)
                if trace:
                    logger.info("%s: cmdq[%d] %s", self.name, q.index(cons),
                                decode_command_words(dw0, dw1))
                if kind == _BATCH:
                    if not batch:
                        batch_start = cons
                    opcode = _OPCODES[dw0 & _OPCODE_MASK]
                    batch.append(_tuple_new(QueuedCommand, (opcode, dw0, dw1)))
                    cons = (cons + 1) & pointer_mask
                    continue
                if batch:
                    failed_at = self._flush_batch(batch, batch_start, q)
                    if failed_at is not None:
                        cons, error = failed_at, CError.ILL
                        break
                error = self._execute(kind, dw0, dw1)
                if error is not _CERROR_NONE:
                    break
                cons = (cons + 1) & pointer_mask
            if error is _CERROR_NONE and len(chunk) < count * COMMAND_SIZE:
                error = CError.ABT
            pending -= count
        if batch:
            # Everything batched precedes any failing command: hand it over first.
            failed_at = self._flush_batch(batch, batch_start, q)
            if failed_at is not None:
                cons, error = failed_at, CError.ILL
        first = q.pointer(self.cmdq_cons)
        self.commands_consumed += q.used(cons, first)
        self.cmdq_cons = (self.cmdq_cons & CMDQ_CONS.ERR.inplace_mask) | cons
        if error is not _CERROR_NONE:
            self._command_error(error, q, cons)
        if self.observer is not None:
            self.observer.commands_consumed(first, cons)
        # The MSIs go out once the consumed commands have been seen: Linux points a
        # SYNC's MSI at the SYNC's own slot, which an observer reads back from the queue.
        if self._msis:
            msis, self._msis = self._msis, []
            for address, data in msis:
                self._sync_msi(address, data)

    def _flush_batch(self, batch: list[QueuedCommand], start: int,
                     q: QueueIndex) -> int | None:
        """Hand ``batch`` (first command at CONS ``start``) to the sink; return the CONS of
        the first refused command, if any."""
        handled = self.sink.invalidate(batch)
        failed: int | None = None
        if 0 <= handled < len(batch):
            failed = q.increment(start, handled)
            logger.info("%s: sink refused %s (batch index %d)", self.name, batch[handled],
                        handled)
        batch.clear()
        return failed

    def _execute(self, kind: int | None, dw0: int, dw1: int) -> CError:
        """Run one non-batched command; return its CERROR (NONE on success)."""
        if kind == _CFGI_STE:
            sid = CMD.SID.get(dw0)
            if not id_fits(sid, self.features.sidsize):
                return _CERROR_NONE
            return _CERROR_NONE if self.sink.ste_changed(sid, sid) else CError.ILL
        if kind == _SYNC:
            cs = CMD.SYNC_CS.get(dw0)
            if cs not in _SYNC_CS_VALUES:
                return CError.ILL
            self.sink.sync()
            if cs == SyncCs.IRQ and self.features.msi:
                self._msis.append((CMD.SYNC_MSIADDR.get(dw1), CMD.SYNC_MSIDATA.get(dw0)))
            return _CERROR_NONE
        if kind == _CFGI_STE_RANGE:
            range_ = CMD.RANGE.get(dw1)
            first, last = cfgi_ste_range_sids(CMD.SID.get(dw0), range_)
            if range_ == CFGI_ALL_RANGE:
                first = 0
            last = min(last, (1 << self.features.sidsize) - 1)
            if first > last:
                return _CERROR_NONE
            return _CERROR_NONE if self.sink.ste_changed(first, last) else CError.ILL
        if kind == _NOP:
            return _CERROR_NONE
        return CError.ILL

    def _sync_msi(self, address: int, data: int) -> None:
        """CMD_SYNC's completion MSI: after everything before it, MSIData at MSIAddress."""
        self.sync_msis += 1
        try:
            self.memory.write(address, data.to_bytes(WORD_BYTES, "little"))
        except GuestMemoryError as exc:
            logger.info("%s: CMD_SYNC MSI write aborted: %s", self.name, exc)
            self._raise_gerror(GERROR.MSI_CMDQ_ABT_ERR)

    def _command_error(self, error: CError, q: QueueIndex, cons: int) -> None:
        self.cmdq_cons = CMDQ_CONS.ERR.put(self.cmdq_cons, error)
        index = q.index(cons)
        logger.info("%s: CERROR_%s at CMDQ index %d", self.name, error.name, index)
        self._raise_gerror(GERROR.CMDQ_ERR)
        if self.on_command_error is not None:
            command: Command | None = None
            if error is not CError.ABT:  # an abort is a command that cannot be read
                address = QUEUE_BASE.ADDR.get(self.cmdq_base) + index * COMMAND_SIZE
                with contextlib.suppress(GuestMemoryError):
                    command = decode_command(self.memory.read(address, COMMAND_SIZE))
            self.on_command_error(error, index, command)

    # ------------------------------------------------------------- event queue

    def record_event(self, event: Event | bytes) -> bool:
        """Write an event record into the guest event queue; return whether it was written.

        Not written (False) when EVENTQEN is clear, when EVENTQ_ABT_ERR is
        active, when the queue is full (OVFLG then flags the overflow) or when
        the write falls outside guest RAM (EVENTQ_ABT_ERR is raised).
        Raises SmmuError if ``event`` is not a 32-byte record (a caller bug).
        """
        data = event.encode() if isinstance(event, Event) else bytes(event)
        if len(data) != EVENT_SIZE:
            raise SmmuError(f"event record of {len(data)} bytes: expected {EVENT_SIZE}")
        if self.trace:
            logger.info("%s: event %s", self.name, event)
        if not CR0.EVENTQEN.test(self.cr0):
            logger.info("%s: event dropped, EVENTQEN=0: %s", self.name, event)
            return False
        if GERROR.EVENTQ_ABT_ERR.test(self.active_errors()):
            logger.info("%s: event dropped, EVENTQ_ABT_ERR active: %s", self.name, event)
            return False
        q = self.evtq_index()
        prod = q.pointer(self.evtq_prod)
        cons = q.pointer(self.evtq_cons)
        if q.used(prod, cons) >= q.size:
            self.signal_event_overflow()
            if self.observer is not None:
                self.observer.event_queue_full(data)
            return False
        address = QUEUE_BASE.ADDR.get(self.evtq_base) + q.index(prod) * EVENT_SIZE
        try:
            self.memory.write(address, data)
        except GuestMemoryError as exc:
            logger.info("%s: event write abort: %s", self.name, exc)
            self._raise_gerror(GERROR.EVENTQ_ABT_ERR)
            return False
        self.evtq_prod = (self.evtq_prod & EVENTQ_PROD.OVFLG.inplace_mask) | q.increment(prod)
        self._update_irq()
        return True

    def signal_event_overflow(self) -> None:
        """Flag an event-queue overflow (OVFLG != OVACKFLG) unless one is already flagged."""
        flagged = EVENTQ_PROD.OVFLG.get(self.evtq_prod)
        acked = EVENTQ_CONS.OVACKFLG.get(self.evtq_cons)
        if flagged == acked:
            self.evtq_prod ^= EVENTQ_PROD.OVFLG.inplace_mask
            logger.info("%s: event queue overflow", self.name)
        self._update_irq()

    # ------------------------------------------------------ translator lookups

    def lookup_ste(self, sid: int) -> SteLookup:
        """Fetch and classify the guest STE of ``sid`` under the current STRTAB registers."""
        if not id_fits(sid, self.features.sidsize):
            return SteLookup(sid, SteStatus.BAD_STREAMID,
                             reason=f"SID {sid:#x} >= 2**SIDSIZE={self.features.sidsize}")
        where = locate_ste(self.memory, self.stream_table(), sid)
        if isinstance(where, SteLookup):
            return where
        try:
            raw = self.memory.read(where, STE_SIZE)
        except GuestMemoryError as exc:
            return SteLookup(sid, SteStatus.FETCH_ABORT, address=where, reason=str(exc))
        # The memory is read every time, as a CFGI_STE requires; its classification is cached.
        return self._ste_cache.classify(self.features, sid, where, raw)

    def lookup_cd(self, ste: SteLookup, ssid: int = 0) -> CdLookup:
        """Fetch and classify the CD of ``ssid`` under the STE ``ste`` looked up before."""
        return lookup_cd(self.memory, self.features, ste, ssid)
