"""The local cluster's record of its processes: a process is recognised by pid and start
time, however the wall clock moves (found on a machine whose clock is slewed: the kernel's
boot time, from which ``create_time()`` is derived, moved by a second every quarter hour,
and every cluster test after that saw the running cluster as stopped)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from crucible.cluster.local.state import Proc


def test_a_recorded_process_is_found_after_the_clock_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from psutil import _pslinux

    me = Proc.of("me", os.getpid())
    assert me.handle() is not None
    before = psutil.Process(os.getpid()).create_time()
    # the wall clock set 5 s ahead: the kernel's boot time moves with it, and so does
    # every create_time()
    real = _pslinux.boot_time
    monkeypatch.setattr(_pslinux, "boot_time", lambda: real() + 5.0)
    monkeypatch.setattr(psutil, "boot_time", lambda: real() + 5.0)
    assert psutil.Process(os.getpid()).create_time() == pytest.approx(before + 5.0)
    assert me.handle() is not None
    # a record of the old kind (create time only) loses the process
    assert Proc("me", os.getpid(), me.create_time).handle() is None


def test_a_recycled_pid_is_not_the_recorded_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = Proc.of("child", child.pid)
        assert rec.handle() is not None
        assert rec.since_boot is not None
        # the same pid started 10 s later is another process
        later = Proc("child", child.pid, rec.create_time + 10, rec.since_boot + 10)
        assert later.handle() is None
    finally:
        child.kill()
        child.wait()
    assert rec.handle() is None  # gone
