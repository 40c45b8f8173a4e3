"""The training loop's callbacks in-process, without Ray or DeepSpeed: hook order and the
TensorBoard logger across a resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from crucible.cluster.storage import location
from crucible.jobs.train.callbacks import Callback, Callbacks, StepResult, TrainContext


def _result(step: int, loss: float) -> StepResult:
    return StepResult(
        step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=1024, samples=16, started=0.0,
        seconds=0.5, data_wait_seconds=0.01, engine_seconds=0.4,
    )  # fmt: skip


def test_hooks_run_in_order_and_later_callbacks_see_what_earlier_ones_set() -> None:
    seen: list[Any] = []

    class SetsMfu(Callback):
        def on_step_end(self, result: StepResult) -> None:
            result.mfu = 0.5

    class Records(Callback):
        def on_step_end(self, result: StepResult) -> None:
            seen.append(result.record())

    Callbacks([SetsMfu(), Records()]).on_step_end(_result(1, 2.0))
    assert seen[0]["mfu"] == 0.5 and "heldout_loss" not in seen[0]
    assert seen[0]["tokens_per_s"] == 1024 / 0.5


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path: Path) -> None:
    """The resumed attempt re-runs steps 4 and 5: TensorBoard shows its values, not the dead
    attempt's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from crucible.jobs.train.callbacks.tensorboard import TensorBoardCallback

    def attempt(start: int, losses: dict[int, float]) -> None:
        ctx = cast(TrainContext, SimpleNamespace(rank=0, run_dir=location(tmp_path), step=start))
        tb = TensorBoardCallback(ctx)
        tb.on_start()
        for step, loss in losses.items():
            tb.on_step_end(_result(step, loss))
        tb.on_end("finished")

    attempt(0, {1: 5.0, 2: 4.0, 3: 3.0, 4: 9.0, 5: 9.0})  # died after step 5; last checkpoint 3
    attempt(3, {4: 2.0, 5: 1.0, 6: 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert got == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0), (6, 0.5)]


def test_a_hang_and_a_checkpoint_load_are_causes_in_the_ledger(tmp_path: Path) -> None:
    """The resume's load time and the watchdog's hang (from the last progress to the firing,
    written before the process would exit) reach the ledger as their own badput causes."""
    import math
    import threading

    from crucible.jobs.train.callbacks import Resumed
    from crucible.jobs.train.callbacks.ledger import LedgerCallback
    from crucible.jobs.train.callbacks.watchdog import WatchdogCallback
    from crucible.monitoring.ledger import account

    spec = SimpleNamespace(train=SimpleNamespace(hang_timeout_s=0.5))
    ctx = cast(
        TrainContext,
        SimpleNamespace(rank=0, world=2, run_dir=location(tmp_path), step=0, spec=spec),
    )
    ledger = LedgerCallback(ctx, resumed_from=3, device="cpu")
    ledger.on_resume(Resumed(3, location(tmp_path), 2, seconds=1.25, bytes=10))
    fired = threading.Event()
    dog = WatchdogCallback(ctx, on_hang=fired.set, record_hang=ledger.on_hang)
    ledger.on_start()
    dog.on_start()
    assert fired.wait(60)  # no progress: the watchdog fires (instead of exiting the process)
    s = account(tmp_path, stale_after_s=math.inf)
    assert s.causes["checkpoint_load"] == 2 * 1.25  # both devices
    assert s.causes["hang"] >= 2 * 0.5  # at least the timeout, on both devices
