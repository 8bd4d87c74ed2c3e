"""``python -m qmp_harness.differential --examples N``: the differential run, summarised.

Starts one QEMU with QEMU's SMMUv3 and one ``vsmmu serve`` + QEMU with ours,
runs QEMU's ported iommu-smmuv3 qtest cases and ``N`` generated scenarios
(hypothesis, fixed ``--seed``) on both, and prints: scenarios run, agreed,
known differences, new differences (each new one in full).  Exit status 1
when any new difference was found.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from guest_images.cache import default_cache
from qmp_harness.differential.cases import ported_cases, scenarios
from qmp_harness.differential.compare import (
    Outcome,
    Summary,
    Verdict,
    known_differences_table,
    run_all,
)
from qmp_harness.differential.scenario import Scenario
from qmp_harness.differential.targets import QemuSmmuTarget, VsmmuTarget
from qmp_harness.provision import ensure_qemu

DEFAULT_EXAMPLES = 300
DEFAULT_SEED = 21


def generate(examples: int, seed: int) -> list[Scenario]:
    """``examples`` scenarios drawn from :func:`~.cases.scenarios` with a fixed seed.

    Drawn in a fresh interpreter that imports only this module: hypothesis also
    draws constants found in the project modules a process has loaded, so in a
    process that had imported more of the project (a pytest session after other
    tests) the same seed drew other scenarios.  In the child the seed alone
    decides, so a run is exactly reproducible from it.
    """
    child = ("import pickle, sys; from qmp_harness.differential.__main__ import draw; "
             f"sys.stdout.buffer.write(pickle.dumps(draw({int(examples)}, {int(seed)})))")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"drawing scenarios failed: {done.stderr.decode(errors='replace')}")
    # Our own child's output, not foreign data.
    scenarios_drawn: list[Scenario] = pickle.loads(done.stdout)
    return scenarios_drawn


def draw(examples: int, seed: int) -> list[Scenario]:
    """Draw in this process (see :func:`generate` for why callers use the child)."""
    drawn: list[Scenario] = []

    @fixed_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        drawn.append(data.draw(scenarios()))

    collect()
    return drawn[:examples]


async def differential(examples: int, seed: int, cache: Path, *,
                       verbose: bool = False) -> Summary:
    """Start both targets, run the ported cases and ``examples`` generated scenarios."""
    install = ensure_qemu(cache, quiet=True)
    cases = [*ported_cases(), *generate(examples, seed)]

    def progress(index: int, outcome: Outcome) -> None:
        if verbose or outcome.verdict is Verdict.NEW:
            print(f"[{index + 1}/{len(cases)}] {outcome.verdict.value}: "
                  f"{outcome.scenario.name}", flush=True)
        elif (index + 1) % 100 == 0:
            print(f"[{index + 1}/{len(cases)}]", flush=True)

    async with VsmmuTarget(install) as ours, QemuSmmuTarget(install) as qemu:
        return await run_all(cases, ours, qemu, progress)


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m qmp_harness.differential",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"generated scenarios (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"hypothesis seed (default {DEFAULT_SEED})")
    parser.add_argument("--cache", type=Path, default=None, help="the vsmmu cache directory")
    parser.add_argument("--verbose", action="store_true", help="print every scenario")
    parser.add_argument("--known-differences", action="store_true",
                        help="print the known-differences table (markdown) and exit")
    args = parser.parse_args(argv)
    if args.known_differences:
        print(known_differences_table())
        return 0
    started = time.monotonic()
    summary = asyncio.run(differential(args.examples, args.seed, args.cache or default_cache(),
                                       verbose=args.verbose))
    print(summary.text())
    print(f"elapsed: {time.monotonic() - started:.1f}s")
    return 1 if summary.count(Verdict.NEW) else 0


if __name__ == "__main__":
    sys.exit(main())
