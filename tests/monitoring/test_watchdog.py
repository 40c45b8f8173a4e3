"""The hang watchdog dumps every thread's stack and fails the attempt; progress keeps it quiet."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from crucible.monitoring.watchdog import Watchdog


def test_progress_keeps_it_quiet(tmp_path: Path) -> None:
    hung = threading.Event()
    w = Watchdog(1.0, tmp_path / "hang.log", hung.set, poll_s=0.05).start()
    for _ in range(20):  # twice the timeout, in steps of a tenth of it
        time.sleep(0.1)
        w.progress()
    w.stop()
    assert not hung.is_set() and not w.fired
    assert not (tmp_path / "hang.log").exists()


def test_hang_dumps_all_threads_then_calls_back_once(tmp_path: Path) -> None:
    calls: list[float] = []
    stuck = threading.Event()

    def blocked_in_a_collective() -> None:
        stuck.wait(10)

    other = threading.Thread(target=blocked_in_a_collective, name="allreduce-thread")
    other.start()
    t0 = time.monotonic()
    w = Watchdog(0.3, tmp_path / "hang.log", lambda: calls.append(time.monotonic() - t0),
                 poll_s=0.05).start()  # fmt: skip
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # it must not fire twice
    stuck.set()
    other.join()
    assert w.fired and len(calls) == 1 and calls[0] >= 0.3  # never before the timeout
    text = (tmp_path / "hang.log").read_text()
    assert "no step progress" in text
    assert "allreduce-thread" in text and "blocked_in_a_collective" in text
    assert "test_hang_dumps_all_threads_then_calls_back_once" in text  # the main thread too


def test_on_hang_can_end_a_stuck_process(tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "from pathlib import Path\n"
        "from crucible.monitoring.watchdog import Watchdog\n"
        f"Watchdog(0.5, Path({str(tmp_path / 'w.log')!r}), lambda: os._exit(17), poll_s=0.05)"
        ".start()\n"
        "def train_step():\n"
        "    time.sleep(60)\n"
        "train_step()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], timeout=300)
    assert out.returncode == 17  # the watchdog's exit, long before train_step could return
    assert "train_step" in (tmp_path / "w.log").read_text()
