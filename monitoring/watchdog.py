"""Hang watchdog: no step progress for ``timeout_s`` → dump every thread's stack, then act.

A training rank calls :meth:`Watchdog.progress` after each step. A daemon thread checks the
time since the last call; past the timeout it appends the Python stacks of all threads to a
log file (so the hang can be diagnosed after the restart) and calls ``on_hang``, once. The
train loop's ``on_hang`` fails the attempt (e.g. ``os._exit`` or interrupting the main
thread), so Ray Train restarts it from the last checkpoint; the ledger counts the work since
that checkpoint as lost.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def dump_stacks(path: Path, reason: str = "") -> None:
    """Append the Python stack of every thread of this process to ``path``.

    Args:
        path: log file (created if missing).
        reason: a header line.
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {reason}\n"]
    for ident, frame in sys._current_frames().items():
        lines.append(f"--- thread {names.get(ident, '?')} ({ident})\n")
        lines.extend(traceback.format_stack(frame))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(lines)
        f.flush()
        # faulthandler also shows frames stuck inside C calls, which format_stack cannot see.
        faulthandler.dump_traceback(file=f, all_threads=True)


class Watchdog:
    """Watches for step progress; see the module docstring.

    Args:
        timeout_s: seconds without :meth:`progress` that count as a hang.
        log_path: where stacks are dumped.
        on_hang: called once, from the watchdog thread, after the dump.
        poll_s: how often to check (default: a tenth of the timeout, at most 5 s).
    """

    def __init__(
        self,
        timeout_s: float,
        log_path: Path,
        on_hang: Callable[[], None],
        poll_s: float | None = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.log_path = Path(log_path)
        self.on_hang = on_hang
        self.poll_s = poll_s if poll_s is not None else min(5.0, self.timeout_s / 10)
        self.fired = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crucible-watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Start watching (the clock starts now)."""
        self._last = time.monotonic()
        self._thread.start()
        return self

    def progress(self) -> None:
        """Note that a step finished (cheap: one clock read)."""
        self._last = time.monotonic()

    def stop(self) -> None:
        """Stop watching (e.g. before a long final save that is not a hang)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.poll_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            self.fired = True
            reason = f"no step progress for {idle:.0f} s (timeout {self.timeout_s:g} s)"
            try:
                dump_stacks(self.log_path, reason)
                log.error("%s; stacks of all threads written to %s", reason, self.log_path)
            except OSError as e:
                log.error("%s; could not write stacks to %s: %s", reason, self.log_path, e)
            self.on_hang()
            return
