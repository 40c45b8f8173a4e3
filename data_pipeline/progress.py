"""Progress display: parts done, documents/s, MB/s and per-step survivor counts (tqdm)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """A tqdm bar over input parts whose postfix shows throughput and per-step counts."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "filter") -> None:
        self.enabled = enabled
        self.t0 = time.time()
        self.bar = (
            tqdm(total=total, unit="file", desc=desc, file=sys.stderr, dynamic_ncols=True)
            if enabled
            else None
        )

    def update(self, n: int, stats: dict[str, Any]) -> None:
        """Advance by ``n`` parts and show the current totals."""
        if self.bar is None:
            return
        dt = max(time.time() - self.t0, 1e-9)
        read = stats.get("read", {})
        steps = " ".join(f"{k}={v.get('docs_out', 0)}" for k, v in stats.items())
        self.bar.set_postfix_str(
            f"{read.get('docs_out', 0) / dt:,.0f} docs/s "
            f"{read.get('bytes_in', 0) / dt / 1e6:,.1f} MB/s {steps}",
            refresh=False,
        )
        self.bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
