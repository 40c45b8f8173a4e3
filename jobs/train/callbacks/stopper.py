"""A graceful stop: ``crucible jobs stop`` writes ``<run>/control/stop.json``; rank 0 notices
it (a background thread polls the run's storage, so no step waits on it), every rank hears
of it through one one-integer broadcast per step, and the loop ends after the current step
with a checkpoint of that step (unless the request says not to) and the ledger's attempt
ended as ``stopped``. The job then ends by itself, its workers gone, before the CLI returns.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
import torch.distributed as dist

from crucible.jobs.runs import stop_request
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext

POLL_S = 1.0


class StopCallback(Callback):
    """Ends the loop after the step during which a stop was requested.

    Args:
        ctx: the rank's training context.
        poll_s: how often rank 0 looks for a request.
    """

    def __init__(self, ctx: TrainContext, poll_s: float = POLL_S) -> None:
        self.ctx = ctx
        self.poll_s = poll_s
        self.request: dict[str, Any] | None = None
        self._seen = threading.Event()
        self._done = threading.Event()

    def on_start(self) -> None:
        if self.ctx.rank == 0:
            threading.Thread(target=self._poll, name="crucible-stop", daemon=True).start()

    def _poll(self) -> None:
        where = stop_request(self.ctx.run_dir)
        while not self._done.wait(self.poll_s):
            with contextlib.suppress(OSError, ValueError):
                data = where.read_json()
                self.request = data if isinstance(data, dict) else {}
                self._seen.set()
                return

    def on_step_end(self, result: StepResult) -> None:
        # every rank joins the broadcast at every step, so all agree on the step to stop at
        flag = torch.tensor([int(self._seen.is_set())], dtype=torch.int32)
        if self.ctx.engine is not None and self.ctx.engine.device.type == "cuda":
            flag = flag.to(self.ctx.engine.device)
        if self.ctx.world > 1:
            dist.broadcast(flag, src=0)
        if int(flag.item()) and not self.ctx.stop_requested:
            self.ctx.stop_requested = True
            self.ctx.stop_checkpoint = bool((self.request or {}).get("checkpoint", True))

    def on_end(self, status: str) -> None:
        self._done.set()
