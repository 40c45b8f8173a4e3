"""What a data run shows while it runs: one progress display per stage, and third-party
logging kept quiet.

On a terminal a stage is a tqdm bar (parts done, documents/s, MB/s, per-step survivors); in a
log (a Ray job's driver output, a pipe) it is a one-line update at most every
:attr:`Progress.every_s` seconds and a line when the stage ends, so a log reads as a record
rather than as carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


def _rate(n: float, dt: float, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return f"{n / scale / dt:,.{digits}f} {unit}/s"


class Progress:
    """One stage's progress: parts done (when counted), documents/s and MB/s.

    Counts passed to :meth:`update` are cumulative; parts found done before the stage
    started (:meth:`skip`) count towards the total but not the rates.
    """

    every_s = 30.0
    """Seconds between one-line updates when the output is not a terminal."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "part",
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """A stage's display.

        Args:
            desc: the stage's name, shown first.
            total: parts in the stage (None: a stage that counts no parts).
            unit: what a part is called.
            enabled: show anything at all.
            stream: where to write (standard error by default).
            clock: seconds (tests pass their own).
        """
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = self.last = clock()
        self.n = self.n0 = 0
        self.docs = self.docs0 = self.nbytes = self.nbytes0 = 0
        self.postfix = ""
        tty = enabled and total is not None and self.stream.isatty()
        self.bar = (
            tqdm(total=total, unit=unit, desc=desc, file=self.stream, dynamic_ncols=True)
            if tty
            else None
        )
        if self.bar is None:
            self.line("started" + (f": {total:,} {unit}s" if total is not None else ""))

    def skip(self, n: int, docs: int = 0, nbytes: int = 0) -> None:
        """``n`` parts (holding ``docs`` documents and ``nbytes`` bytes) already done."""
        self.n0, self.docs0, self.nbytes0 = n, docs, nbytes
        self.n, self.docs, self.nbytes = n, docs, nbytes
        if self.bar is not None and n:
            self.bar.update(n)

    def rates(self) -> str:
        """Documents/s and MB/s of this stage's work so far ('' with no documents)."""
        dt = max(self.clock() - self.t0, 1e-9)
        docs, nbytes = self.docs - self.docs0, self.nbytes - self.nbytes0
        out = []
        if docs:
            out.append(_rate(docs, dt, "docs"))
        if nbytes:
            out.append(_rate(nbytes, dt, "MB", 1e6, 1))
        return "  ".join(out)

    def update(
        self, n: int = 1, docs: int | None = None, nbytes: int | None = None, postfix: str = ""
    ) -> None:
        """``n`` more parts done; ``docs`` and ``nbytes``: the stage's totals so far."""
        self.n += n
        self.docs = self.docs if docs is None else docs
        self.nbytes = self.nbytes if nbytes is None else nbytes
        self.postfix = postfix
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.rates()} {postfix}".strip(), refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.line(self._parts(), tail=self.postfix)

    def _parts(self) -> str:
        return f"{self.n:,}/{self.total:,} {self.unit}s" if self.total is not None else ""

    def line(self, *fields: str, tail: str = "") -> None:
        """Write ``[stage] fields  rates  tail`` as one line (when enabled)."""
        if not self.enabled:
            return
        text = "  ".join(f for f in (*fields, self.rates(), tail) if f)
        print(f"[{self.desc}] {text}", file=self.stream, flush=True)

    def close(self, summary: str = "") -> None:
        """End the display with a line: the time taken, the rates and ``summary``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        secs = f"done in {self.clock() - self.t0:,.1f} s"
        self.line(secs, self._parts(), tail=summary or self.postfix)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()


def step_counts(stats: dict[str, Any]) -> tuple[int, int, str]:
    """``(documents, bytes, per-step survivors)`` of a stage's summed step statistics: the
    documents and bytes into its first step."""
    if not stats:
        return 0, 0, ""
    first = next(iter(stats.values()))
    steps = " ".join(f"{k}={v.get('docs_out', 0):,}" for k, v in stats.items())
    return int(first.get("docs_in", 0)), int(first.get("bytes_in", 0)), steps
