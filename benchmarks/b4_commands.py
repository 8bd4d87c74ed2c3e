"""B4: command throughput in-process, through model + translator + sim backend.

A Linux-like guest driver (:class:`vsmmu.smmu.guest_driver.GuestDriver`)
probes and resets the SMMU, points an endpoint's STE at a stage-1 context,
then the command queue is filled once with batches of ``BATCH - 1`` commands
followed by a CMD_SYNC (Linux's batch of 64).  The timed loop is what the
guest's CPU does per batch: one write of CMDQ_PROD, one read of CMDQ_CONS.
Commands/s counts every command consumed, the CMD_SYNCs included.

Baseline in the same run: the same model and queue with a
:class:`~vsmmu.smmu.NullConfigSink` (no translator, no backend), so the ratio
is the share of time the nesting path leaves to the guest.  Its samples
alternate with ours (:func:`benchmarks.report.sample_round`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

from benchmarks.report import BenchmarkError, RoundBenchmark, Section, Settings, sample_round
from vsmmu.arch import CmdOpcode, Ste, SteConfig, encode_command
from vsmmu.arch.commands import COMMAND_SIZE, SyncCs, TlbiTg
from vsmmu.arch.registers import GERROR, Reg
from vsmmu.iommufd.backend import HostMapping
from vsmmu.iommufd.sim import SimIommufd
from vsmmu.nesting import NestingTranslator
from vsmmu.smmu import ConfigSink, GuestRam, NullConfigSink, SmmuFeatures, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver

logger = logging.getLogger(__name__)

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 22
ENDPOINT_SID = 0x08
CD_TABLE = RAM_BASE + 0x8_0000
ASID = 1
BATCH = 64
"""Commands per CMD_SYNC batch, the SYNC included (Linux: CMDQ_BATCH_ENTRIES = 64)."""
BATCHES = 2000
QUICK_BATCHES = 20


class CommandRig:
    """A probed, reset SMMU with its queue pre-filled by batches of one command kind."""

    def __init__(self, sink_factory: Callable[[GuestRam], ConfigSink], command: bytes) -> None:
        self.ram = GuestRam(RAM_BASE, RAM_SIZE)
        self.sink = sink_factory(self.ram)
        self.smmu = SmmuV3(self.ram, self.sink, SmmuFeatures())
        if isinstance(self.sink, NestingTranslator):
            self.sink.bind(self.smmu)
        self.driver = GuestDriver(self.smmu, self.ram)
        self.driver.probe()
        self.driver.reset()
        self.driver.write_ste(ENDPOINT_SID, Ste(v=1, config=SteConfig.S1_TRANS,
                                                s1_context_ptr=CD_TABLE))
        self._fill(command)

    def _fill(self, command: bytes) -> None:
        queue, driver = self.driver.cmdq, self.driver
        if queue.size % BATCH:
            raise BenchmarkError(f"command queue of {queue.size} entries, expected a multiple "
                                 f"of the batch {BATCH}")
        sync = encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV)
        # Advance to a batch boundary (with SYNCs) so every PROD write covers one batch.
        pad = (-queue.index(driver.cmdq_prod)) % BATCH
        if pad:
            driver.issue(*[sync] * (pad - 1))
        for index in range(queue.size):
            entry = sync if index % BATCH == BATCH - 1 else command
            self.ram.write(driver.cmdq_base + index * COMMAND_SIZE, entry)

    def run(self, batches: int) -> float:
        """Issue ``batches`` batches; return commands per second."""
        driver, smmu, queue = self.driver, self.smmu, self.driver.cmdq
        prod = driver.cmdq_prod
        before = smmu.commands_consumed
        start = time.perf_counter_ns()
        for _ in range(batches):
            prod = queue.increment(prod, BATCH)
            smmu.write(Reg.CMDQ_PROD, 4, prod)
            cons = smmu.read(Reg.CMDQ_CONS, 4)
        elapsed = time.perf_counter_ns() - start
        driver.cmdq_prod = prod
        consumed = smmu.commands_consumed - before
        if cons != prod or smmu.active_errors() & GERROR.CMDQ_ERR.inplace_mask:
            raise BenchmarkError(f"command queue stopped: CONS={cons:#x}, expected PROD="
                                 f"{prod:#x}, GERROR active {smmu.active_errors():#x}")
        if consumed != batches * BATCH:
            raise BenchmarkError(f"model consumed {consumed} commands, expected "
                                 f"{batches * BATCH}")
        return consumed / (elapsed / 1e9)


def _nesting_sink(ram: GuestRam) -> ConfigSink:
    sim = SimIommufd()
    translator = NestingTranslator(sim)
    translator.map_guest_ram(RAM_BASE, HostMapping(ram.data))
    dev = sim.create_mock_device(ENDPOINT_SID, name="bench-ep")
    translator.add_endpoint(ENDPOINT_SID, dev, "bench-ep")
    return translator


def _null_sink(_ram: GuestRam) -> ConfigSink:
    return NullConfigSink()


COMMANDS: dict[str, tuple[str, bytes]] = {
    "tlbi_nh_va": ("TLBI_NH_VA", encode_command(CmdOpcode.TLBI_NH_VA, asid=ASID, leaf=1,
                                                 tg=TlbiTg.NONE, address=0x1000_0000)),
    "cfgi_ste": ("CFGI_STE", encode_command(CmdOpcode.CFGI_STE, sid=ENDPOINT_SID, leaf=1)),
}


class CommandBenchmark(RoundBenchmark):
    """B4 (module docstring): per round, each command kind through ours and the baseline."""

    ids = ("B4",)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batches = QUICK_BATCHES if settings.quick else BATCHES
        self.rigs = {key: (CommandRig(_nesting_sink, command), CommandRig(_null_sink, command))
                     for key, (_name, command) in COMMANDS.items()}
        self.samples: dict[str, tuple[list[float], list[float]]] = {
            key: ([], []) for key in COMMANDS}

    async def round(self, index: int) -> None:
        """One sample of every figure, ours and its baseline in turn."""
        for key, (ours, base) in self.rigs.items():
            full, null = sample_round(self.settings, index, [
                partial(ours.run, self.batches), partial(base.run, self.batches)])
            self.samples[key][0].append(full)
            self.samples[key][1].append(null)

    def sections(self) -> list[Section]:
        """The B4 section."""
        section = Section("B4", "command throughput (model + translator + sim)")
        for key, (name, _command) in COMMANDS.items():
            full_samples, null_samples = self.samples[key]
            full = section.figure(f"B4.{key}",
                                  f"{name}+CMD_SYNC x{BATCH}: model+translator+sim",
                                  "commands/s", full_samples, higher_is_better=True)
            null = section.figure(f"B4.{key}_null", f"{name}+CMD_SYNC x{BATCH}: model, null sink",
                                  "commands/s", null_samples, higher_is_better=True)
            section.ratio(f"B4.{key}_ratio", f"{name}: full path / model alone", full, null)
        section.notes.append(f"batches of {BATCH - 1} commands + CMD_SYNC; per batch the guest "
                             "writes CMDQ_PROD once and reads CMDQ_CONS once; SYNCs are counted")
        return [section]
