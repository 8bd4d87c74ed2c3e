"""qmp-shell (from the qemu.qmp package) against the monitor, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from typing import Any

import pytest

from vsmmu.qmp import Arg, QmpMonitor

QMP_SHELL = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable), "qmp-shell")


@pytest.mark.skipif(not os.path.exists(QMP_SHELL), reason="qmp-shell is not installed")
async def test_qmp_shell_negotiates_and_executes(monitor: QmpMonitor, tmp_path: Any) -> None:
    monitor.register(
        "x-vsmmu-echo",
        lambda args: {"sid": args["sid"], "note": args["note"]},
        doc="Echo the arguments.",
        args=[Arg("sid", int), Arg("note", str)],
    )
    proc = await asyncio.create_subprocess_exec(
        QMP_SHELL,
        monitor.socket_path,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path)},  # keep its history file out of ~
    )
    out, _ = await asyncio.wait_for(
        proc.communicate(b"x-vsmmu-echo sid=5 note=hi\nquery-nothing\n"), 30
    )
    text = out.decode()
    assert proc.returncode == 0, text
    # The banner is built from the greeting's version.qemu triple.
    assert "Connected to QEMU " in text
    assert '{"return": {"sid": 5, "note": "hi"}}' in text
    assert "The command query-nothing has not been found" in text
