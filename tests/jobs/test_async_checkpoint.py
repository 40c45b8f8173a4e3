"""Asynchronous checkpoint saves (``checkpoint.async_save``): host copies that write the files
``torch.save`` would have written at the time of the copy, one save in flight at most, the
checkpointer waiting for the previous save before the next and at the end of the run, and on
2 gloo ranks: an asynchronous save committing the very files of a synchronous one while the
engine trains on, and a run killed while a save is in flight resuming bitwise from the
checkpoint before it."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from crucible.cluster.storage import Location, location
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks import Callback, Callbacks, StepResult
from crucible.jobs.train.callbacks import checkpointer as checkpointer_mod
from crucible.jobs.train.callbacks import ledger as ledger_mod
from crucible.jobs.train.callbacks.checkpointer import CheckpointerCallback
from crucible.jobs.train.callbacks.ledger import LedgerCallback
from crucible.jobs.train.checkpoint import async_save
from crucible.jobs.train.checkpoint.host_copy import HostBuffers, Stager, host_copy
from crucible.jobs.train.checkpoint.in_flight import IN_FLIGHT, SaveSlot
from crucible.jobs.train.export import consolidate
from crucible.monitoring.ledger import account
from crucible.monitoring.ledger_format import read_attempts

BATCH = 16


def _bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- host copies ---------------------------------------------------------------------------


def test_a_host_copy_saves_the_bytes_torch_save_would_have_written_then() -> None:
    flat = torch.arange(12, dtype=torch.float32)
    param = torch.nn.Parameter(torch.randn(3, 4))
    tagged = torch.randn(5, requires_grad=True)
    tagged.ds_id = 7  # DeepSpeed tags its fp32 partitions so; torch.save keeps the attribute
    obj = {
        "flat": flat,
        "view": flat[2:6],  # shares the storage of "flat": saved once
        "groups": [param, (tagged, "x", None)],
        "step": torch.tensor(3.0),
        "placeholder": torch.empty(0, dtype=torch.bfloat16),  # a ZeRO-3 partitioned parameter
        "shape": torch.Size([2, 3]),
        "bf16": torch.randn(4).bfloat16(),
    }
    want = _bytes(obj)
    buffers = HostBuffers(pinned=False)
    copy = host_copy(obj, buffers)
    flat.add_(1)  # training goes on: every tensor changes in place
    param.data.mul_(2)
    tagged.data.zero_()
    assert _bytes(obj) != want
    restored = copy.restore()
    assert _bytes(restored) == want
    assert restored["view"].untyped_storage().data_ptr() == restored["flat"].data_ptr()
    assert isinstance(restored["groups"][0], torch.nn.Parameter)
    assert restored["groups"][1][0].ds_id == 7 and restored["groups"][1][0].requires_grad
    assert copy.nbytes == (12 + 12 + 5 + 1) * 4 + 4 * 2  # the view adds nothing

    buffers.give_back([s for s, _ in copy.storages])  # the next save reuses the memory
    held = buffers.nbytes
    again = host_copy(obj, buffers)
    assert buffers.nbytes == 0 and again.nbytes == held


def test_a_deferred_copy_is_taken_when_staged_on_another_thread() -> None:
    """What an asynchronous save does: the copy is set aside while the loop waits, filled by
    the save's thread, and the loop waits for that before the state changes."""
    weights = torch.arange(6, dtype=torch.float32)
    obj = {"weights": weights, "built_for_the_save": torch.full((3,), 2.0)}
    want = _bytes(obj)
    copy = host_copy(obj, HostBuffers(pinned=False), defer=True)
    del obj["built_for_the_save"]  # the copy keeps a temporary alive until it is taken
    assert not copy.staged
    with pytest.raises(RuntimeError, match="not staged"):
        copy.restore()
    stager = Stager([copy])
    thread = threading.Thread(target=stager.run)
    thread.start()
    stager.wait()
    thread.join()
    assert stager.done and copy.staged and stager.wait() == 0.0
    weights.add_(1)  # the optimizer step, after the wait
    assert _bytes(copy.restore()) == want


# -- one save in flight ------------------------------------------------------------------


def test_the_slot_refuses_a_second_save_until_the_first_is_taken() -> None:
    slot, release = SaveSlot(), threading.Event()
    slot.start(lambda: release.wait() and "first", name="first")
    with pytest.raises(RuntimeError, match="already in flight"):
        slot.start(lambda: "second", name="second")
    assert slot.take(block=False) is None and slot.busy  # still being written
    release.set()
    slot.join()  # finished, but kept until taken: a finished save is still reported
    assert slot.busy
    with pytest.raises(RuntimeError, match="already in flight"):
        slot.start(lambda: "second", name="second")
    fut = slot.take(block=False)
    assert fut is not None and fut.result() == "first" and not slot.busy
    slot.start(lambda: "second", name="second")
    fut = slot.take(block=True)
    assert fut is not None and fut.result() == "second"


def test_the_slot_hands_back_a_failed_save_s_error() -> None:
    slot = SaveSlot()

    def fail() -> None:
        raise OSError("disk full")

    slot.start(fail, name="failing")
    fut = slot.take(block=True)
    assert fut is not None
    with pytest.raises(OSError, match="disk full"):
        fut.result()
    assert not slot.busy


def _checkpointer(tmp_path: Path, events: list[str], total_steps: int) -> CheckpointerCallback:
    """A checkpointer on one rank with a fake engine and callbacks that log on_save."""
    spec = parse_spec({
        "kind": "train", "name": "fake", "cluster": {"storage": str(tmp_path)},
        "model": {"preset": "tiny"}, "data": {"shards": str(tmp_path / "shards")},
        "checkpoint": {"every_steps": 5, "keep_last": 10}, "train": {"max_steps": total_steps},
    })  # fmt: skip
    callbacks = SimpleNamespace(on_save=lambda stats, t0: events.append(f"on_save {stats.step}"))
    ctx = SimpleNamespace(
        spec=spec, plan=SimpleNamespace(total_steps=total_steps), rank=0, world=1,
        use_gpu=False, engine=object(), checkpoints=location(tmp_path / "checkpoints"),
        callbacks=callbacks, launcher=None, stop_requested=False, stop_checkpoint=True, step=0,
        reader=SimpleNamespace(samples_consumed=0, state_dict=lambda: {}),
    )  # fmt: skip
    ledger = SimpleNamespace(checkpoint_state=lambda: {})
    return CheckpointerCallback(ctx, ledger)  # type: ignore[arg-type]


def _staged() -> Stager:
    stager = Stager([])
    stager.run()
    return stager


def _step(n: int) -> Any:
    return SimpleNamespace(step=n, record=lambda: {"step": n})


def test_the_checkpointer_waits_for_the_save_in_flight_before_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5's write is held until the checkpointer waits for it (or, were it not to wait,
    until step 10's snapshot begins): step 10 is snapshotted only after step 5 is committed
    and reported. The last step waits for its own save."""
    events: list[str] = []
    gates = {5: threading.Event(), 10: threading.Event(), 12: threading.Event()}
    waiting = threading.Event()  # the loop is blocked on the save in flight (or went past it)
    gates[10].set()
    gates[12].set()

    def snapshot(engine, root, step, state, rank, buffers):  # type: ignore[no-untyped-def]
        events.append(f"snapshot {step}")
        waiting.set()
        return async_save.Snapshot(
            step, tmp_path, [], _staged(), {}, state, True, time.perf_counter(), time.time(), 0
        )

    def write(snap, root, rank, world, group=None, stall=False):  # type: ignore[no-untyped-def]
        events.append(f"write {snap.step}")
        gates[snap.step].wait(timeout=60)
        events.append(f"committed {snap.step}")
        return ckpt.SaveStats(snap.step, ckpt.step_path(root, snap.step), 1, 0.1, write=0.1)

    real_take = IN_FLIGHT.take

    def take(block: bool) -> Any:
        if block:
            waiting.set()
        return real_take(block)

    monkeypatch.setattr(async_save, "take_snapshot", snapshot)
    monkeypatch.setattr(async_save, "write_snapshot", write)
    monkeypatch.setattr(checkpointer_mod, "supports_async", lambda engine: True)
    monkeypatch.setattr(IN_FLIGHT, "take", take)
    monkeypatch.setattr("torch.distributed.new_group", lambda **kw: None)
    (tmp_path / "checkpoints").mkdir()
    cb = _checkpointer(tmp_path, events, total_steps=12)

    cb.on_step_end(_step(5))
    assert cb.saver is not None and cb.saver.in_flight  # the loop goes on while it writes
    waiting.clear()

    def release_step_5() -> None:
        waiting.wait(timeout=60)
        gates[5].set()

    helper = threading.Thread(target=release_step_5)
    helper.start()
    cb.on_step_end(_step(10))
    helper.join()
    cb.on_step_end(_step(11))  # step 10's save may or may not be committed by now
    cb.on_step_end(_step(12))  # the last step: its save is committed before the loop ends
    assert not cb.saver.in_flight and not IN_FLIGHT.busy
    assert events[:5] == ["snapshot 5", "write 5", "committed 5", "on_save 5", "snapshot 10"]
    assert events[-4:] == ["snapshot 12", "write 12", "committed 12", "on_save 12"]
    assert events.count("on_save 10") == 1 and events.index("on_save 10") < events.index(
        "snapshot 12"
    )


def test_a_save_is_told_of_once_committed_and_stays_in_flight_until_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's report (Ray Train's, a barrier) runs after the commit in the background:
    the loop hears of the checkpoint without waiting for it, but no save starts before it."""
    reported, commits = threading.Event(), threading.Event()

    def snapshot(engine, root, step, state, rank, buffers):  # type: ignore[no-untyped-def]
        return async_save.Snapshot(
            step, tmp_path, [], _staged(), {}, state, True, time.perf_counter(), time.time(), 0
        )

    def write(snap, root, rank, world, group=None, stall=False):  # type: ignore[no-untyped-def]
        return ckpt.SaveStats(snap.step, ckpt.step_path(root, snap.step), 1, 0.1, write=0.1)

    def report(stats: ckpt.SaveStats) -> None:
        commits.set()
        reported.wait(timeout=60)

    monkeypatch.setattr(async_save, "take_snapshot", snapshot)
    monkeypatch.setattr(async_save, "write_snapshot", write)
    monkeypatch.setattr("torch.distributed.new_group", lambda **kw: None)
    saver = async_save.AsyncSaver(location(tmp_path), 0, 1, pinned=False, slot=SaveSlot())
    saver.start(object(), 5, {}, then=report)  # type: ignore[arg-type]
    commits.wait(timeout=60)
    stats = saver.poll()
    assert stats is not None and stats.step == 5 and saver.in_flight
    assert saver.poll() is None  # told of once
    with pytest.raises(RuntimeError, match="already in flight"):
        saver.start(object(), 10, {})  # type: ignore[arg-type]
    reported.set()
    assert saver.wait() is None and not saver.in_flight and not saver.slot.busy
    saver.start(object(), 10, {})  # type: ignore[arg-type]
    stats = saver.wait()
    assert stats is not None and stats.step == 10


# -- what the ledger bills: the loop's wait, never the background write ----------------------

STEP_S, COPY_S, FLUSH_S, STAGE_S = 10.0, 1.0, 2.0, 0.5
# A real run's step ends at its unix start plus a perf_counter duration and the next record
# begins at a fresh time.time(): the two clocks may disagree by this much at a boundary.
CLOCK_SLACK_S = 0.01
# The checkpoint phase is the sum of the same spans metrics.jsonl sums: up to float rounding.
SUM_SLACK_S = 1e-6


class _Clock:
    """The checkpointer's clock in the fast tests: time passes only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()  # not before the ledger's attempt began

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Stager:
    """A save's staging that the next step waits ``seconds`` for, on the fake clock."""

    def __init__(self, clock: _Clock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def run(self) -> None:
        pass

    def wait(self) -> float:
        waited, self.seconds = self.seconds, 0.0
        self.clock.advance(waited)
        return waited


class _Told(Callback):
    """Built before the checkpointer: what it is told of, and that it is told before it ends."""

    def __init__(self) -> None:
        self.saves: list[ckpt.SaveStats] = []
        self.ended = False

    def on_save(self, stats: ckpt.SaveStats, t0: float) -> None:
        assert not self.ended, f"told of step-{stats.step} after the end"
        self.saves.append(stats)

    def on_end(self, status: str) -> None:
        self.ended = True


def _ledgered(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gates: dict[int, threading.Event],
    stage_s: float = 0.0,
) -> tuple[Any, _Told, _Clock]:
    """One rank of a 6-step run, a save every 2 steps, with the real ledger before the
    checkpointer; snapshots take ``COPY_S`` on the fake clock, the step after a save waits
    ``stage_s`` for its staging, writes take none of it (they overlap the steps) and the
    write of a step in ``gates`` waits for its gate."""
    clock = _Clock()
    spec = parse_spec({
        "kind": "train", "name": "fake", "cluster": {"storage": str(tmp_path)},
        "model": {"preset": "tiny"}, "data": {"shards": str(tmp_path / "shards")},
        "checkpoint": {"every_steps": 2, "keep_last": 10}, "train": {"max_steps": 6},
    })  # fmt: skip
    ctx = SimpleNamespace(
        spec=spec, plan=SimpleNamespace(total_steps=6), rank=0, world=1, use_gpu=False,
        engine=object(), run_dir=location(tmp_path), checkpoints=location(tmp_path / "ckpt"),
        launcher=None, stop_requested=False, stop_checkpoint=True, step=0,
        reader=SimpleNamespace(samples_consumed=0, state_dict=lambda: {}),
    )  # fmt: skip
    ledger = LedgerCallback(ctx, resumed_from=0, device="cpu")  # type: ignore[arg-type]
    told = _Told()
    ctx.callbacks = Callbacks([ledger, told, CheckpointerCallback(ctx, ledger)])  # type: ignore[arg-type]

    def snapshot(engine, root, step, state, rank, buffers):  # type: ignore[no-untyped-def]
        clock.advance(COPY_S)
        stager = _Stager(clock, stage_s)
        return async_save.Snapshot(step, tmp_path, [], stager, {}, state, True, 0.0, 0.0, 0.0)

    def write(snap, root, rank, world, group=None, stall=False):  # type: ignore[no-untyped-def]
        if snap.step in gates:
            gates[snap.step].wait(timeout=60)
        return ckpt.SaveStats(snap.step, ckpt.step_path(root, snap.step), 1, 0.1, write=0.1)

    monkeypatch.setattr(async_save, "take_snapshot", snapshot)
    monkeypatch.setattr(async_save, "write_snapshot", write)
    monkeypatch.setattr(checkpointer_mod, "supports_async", lambda engine: True)
    monkeypatch.setattr(checkpointer_mod, "time", clock)
    monkeypatch.setattr(ledger_mod, "time", clock)
    monkeypatch.setattr("torch.distributed.new_group", lambda **kw: None)
    (tmp_path / "ckpt").mkdir()
    return ctx, told, clock


def _train(ctx: Any, clock: _Clock, steps: range, join: bool = True) -> None:
    checkpointer = ctx.callbacks.find(CheckpointerCallback)
    for n in steps:
        started = clock.time()
        waited = checkpointer.wait_staged()  # as the loop's train_step, before the update
        clock.advance(STEP_S)
        ctx.step = n
        ctx.callbacks.on_step_end(StepResult(
            step=n, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=BATCH * 64, samples=BATCH,
            started=started, seconds=STEP_S + waited, data_wait_seconds=0.0,
            engine_seconds=STEP_S + waited, checkpoint_wait_seconds=waited,
        ))  # fmt: skip
        if join:
            IN_FLIGHT.join()  # a save is written and committed during the next step


def _check_ledger(run_dir: Path | Location, blocked_seconds: float, devices: int) -> Any:
    """No device-second billed twice, and saves billed for the loop's wait only.

    Within each attempt the ledger's intervals do not overlap (but for ``CLOCK_SLACK_S``), so
    its total is within the run's wall time; its checkpoint phase is ``blocked_seconds``
    (the sum of ``metrics.jsonl``'s, times the devices; ``SUM_SLACK_S`` per device).
    """
    attempts, corrupt = read_attempts(run_dir)
    assert corrupt == 0 and attempts
    bounds = 0
    for a in attempts:
        spans = sorted(
            (r["t0"], r["t1"], r["kind"], r.get("step"))
            for r in a.records if r["kind"] != "checkpoint_load"  # inside start-up
        )  # fmt: skip
        for before, after in itertools.pairwise(spans):
            assert after[0] >= before[1] - CLOCK_SLACK_S, (before, after)
        bounds += len(spans)
    s = account(run_dir)
    assert s.total_seconds <= s.devices * (s.wall_seconds + bounds * CLOCK_SLACK_S)
    assert s.seconds["checkpoint"] == pytest.approx(devices * blocked_seconds, abs=SUM_SLACK_S)
    return s


def test_the_ledger_bills_an_async_save_for_the_copy_not_for_the_steps_it_overlaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 2 and 4's saves are committed during the next step and told of at its end:
    billing them from their start to then would bill that step twice."""
    ctx, told, clock = _ledgered(tmp_path, monkeypatch, gates={}, stage_s=STAGE_S)
    _train(ctx, clock, range(1, 7))
    ctx.callbacks.on_end("finished")
    assert [s.step for s in told.saves] == [2, 4, 6]
    # Steps 3 and 5 waited for the staging of the save before them; step 6's save is the
    # run's last (its wait for the commit is in its span).
    assert [s.blocked_seconds for s in told.saves] == [COPY_S + STAGE_S] * 2 + [COPY_S]
    s = _check_ledger(tmp_path, sum(x.blocked_seconds for x in told.saves), devices=1)
    assert s.finished and s.seconds["productive"] == pytest.approx(6 * STEP_S)
    (attempt,), _ = read_attempts(tmp_path)
    waits = {r["step"]: r.get("checkpoint_wait") for r in attempt.records if r["kind"] == "step"}
    assert waits == {1: None, 2: None, 3: STAGE_S, 4: None, 5: STAGE_S, 6: None}


@pytest.mark.parametrize("ending", ["failure", "stop without a checkpoint"])
def test_a_save_in_flight_as_the_loop_ends_is_waited_for_billed_and_told_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Step 4's save is still being written when the loop ends after step 5: step 5 failed
    (the attempt's end waits for the save) or a stop asked for no checkpoint (step 5's end
    waits for it). That wait (``FLUSH_S``) is billed to the save, and the ledger and the
    other callbacks hear of it before they end: steps 1-4 are in a committed checkpoint."""
    gates = {4: threading.Event()}
    ctx, told, clock = _ledgered(tmp_path, monkeypatch, gates)
    _train(ctx, clock, range(1, 4))
    _train(ctx, clock, range(4, 5), join=False)
    waiting = threading.Event()
    real_take = IN_FLIGHT.take

    def take(block: bool) -> Any:
        if block:
            waiting.set()
        return real_take(block)

    def write_on() -> None:  # once the loop waits for the save, it takes FLUSH_S more
        waiting.wait(timeout=60)
        clock.advance(FLUSH_S)
        gates[4].set()

    monkeypatch.setattr(IN_FLIGHT, "take", take)
    helper = threading.Thread(target=write_on)
    helper.start()
    if ending == "failure":
        clock.advance(STEP_S)  # step 5, which fails: no step end
        status = "failed"
    else:
        ctx.stop_requested, ctx.stop_checkpoint = True, False
        _train(ctx, clock, range(5, 6), join=False)
        status = "stopped"
    ctx.callbacks.on_end(status)
    helper.join()
    assert not IN_FLIGHT.busy
    assert [s.step for s in told.saves] == [2, 4]
    assert told.saves[-1].blocked_seconds == pytest.approx(COPY_S + FLUSH_S)
    (attempt,), _ = read_attempts(tmp_path)
    assert attempt.status == status
    assert {r["step"] for r in attempt.records if r["kind"] == "checkpoint"} == {2, 4}
    s = _check_ledger(tmp_path, sum(x.blocked_seconds for x in told.saves), devices=1)
    assert s.seconds["productive"] == pytest.approx(4 * STEP_S)
    assert s.seconds["lost"] == pytest.approx(0 if ending == "failure" else STEP_S)


# -- 2 gloo ranks ----------------------------------------------------------------------------


def _equal(a: Any, b: Any) -> bool:
    """Saved states equal in value (a resumed run's pickles may share strings differently)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _equal(vars(a), vars(b))
    return bool(a == b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec_data(name: str, storage: Path, shards: Path, **checkpoint: Any) -> dict[str, Any]:
    return {
        "kind": "train", "name": name, "cluster": {"storage": str(storage)},
        "model": {"preset": "tiny"}, "data": {"shards": str(shards)},
        "optim": {"global_batch_size": BATCH, "micro_batch_size": 4, "warmup_steps": 5,
                  "lr": 1e-3},
        "checkpoint": {"every_steps": 2, "keep_last": 5, **checkpoint},
        "train": {"num_workers": 2, "max_steps": 6},
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_an_async_save_commits_the_files_of_a_sync_save_while_training_goes_on(
    tmp_path: Path, train_shards: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    """On a local disk (stage renamed into place) and on an object store (each rank uploads
    its files from node-local scratch, from the background thread)."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_data("w", tmp_path, train_shards)))
    root = str(tmp_path)
    if storage == "s3":
        root = f"{request.getfixturevalue('s3').bucket('ckpt')}/{request.node.name}"
    worker = Path(__file__).with_name("async_ckpt_worker.py")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(worker), str(spec_path), str(tmp_path), root],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["in_flight"]  # the engine trained a step while the save was not committed
        assert r["unstaged_until_update"]  # its forward and backward ran before the copy
        assert "already in flight" in r["second"]  # and no second save could start
        assert r["reused_bytes"] == r["snapshot_bytes"] > 0
        assert r["blocked"] <= r["seconds"] and r["write"] <= r["seconds"]
    sync_root, async_root = location(root) / "sync", location(root) / "async"
    sync = ckpt.read_manifest(ckpt.step_path(sync_root, 1))
    asyn = ckpt.read_manifest(ckpt.step_path(async_root, 1))
    assert sync["world_size"] == asyn["world_size"] == 2
    assert sync["files"] == asyn["files"]  # every file byte for byte (sha256 and size)
    assert ckpt.verify(ckpt.step_path(async_root, 1), "sha256") is None
    assert (async_root / "latest").read_text().strip() == "step-1"


def _standalone(run_dir: Path, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir), "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )  # fmt: skip


def _records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir, "step")}


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory, train_shards: Path) -> Path:
    """6 steps, a checkpoint every 2, saved synchronously: the reference."""
    storage = tmp_path_factory.mktemp("async-ckpt-runs")
    spec = parse_spec(_spec_data("sync", storage, train_shards, async_save=False))
    run_dir = prepare_run(spec).local_path
    proc = _standalone(run_dir)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    return run_dir


@pytest.mark.slow
def test_a_kill_while_a_save_is_in_flight_leaves_the_previous_checkpoint_and_resumes_bitwise(
    tmp_path: Path, train_shards: Path, sync_run: Path
) -> None:
    """The asynchronous save of step 4 writes its files and never commits
    (``checkpoint.test_stall_steps``); once step 5 has trained, with that save still in
    flight, both ranks are SIGKILLed. step-2 stays the latest, step-4 is nowhere committed,
    and the run resumed from step-2 matches the synchronous reference bitwise: every loss,
    the final weights and crucible's state at every checkpoint."""
    data = _spec_data("killed", tmp_path, train_shards, test_stall_steps=[4])
    run_dir = prepare_run(parse_spec(data)).local_path  # type: ignore[arg-type]
    proc = _standalone(run_dir)
    deadline = time.monotonic() + 600  # a bound on a broken run, not on the code's speed
    while 5 not in _losses(run_dir):
        assert proc.poll() is None, proc.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no step 5 within 600 s"
        time.sleep(0.05)
    for rank in (0, 1):
        os.kill(int((run_dir / "workers" / f"rank-{rank}.pid").read_text()), signal.SIGKILL)
    proc.communicate(timeout=120)

    root = location(run_dir / "checkpoints")
    assert ckpt.committed_steps(root) == [2]
    assert (root / "latest").read_text().strip() == "step-2"
    assert (run_dir / "checkpoints" / "step-4.tmp" / "ds").is_dir()  # written, not committed
    assert not (run_dir / "checkpoints" / "step-4").exists()
    assert [r["step"] for r in _records(run_dir, "checkpoint")] == [2]

    del data["checkpoint"]["test_stall_steps"]
    spec = parse_spec(data)
    assert isinstance(spec, TrainRunSpec)
    prepare_run(spec, resume=True)
    proc = _standalone(run_dir)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    (resume,) = _records(run_dir, "resume")
    assert resume["step"] == 2
    assert _losses(run_dir) == _losses(sync_run)  # every step, bitwise
    assert ckpt.committed_steps(root) == [2, 4, 6]
    ref_root = location(sync_run / "checkpoints")
    ours, _ = consolidate(ckpt.step_path(root, 6))
    theirs, _ = consolidate(ckpt.step_path(ref_root, 6))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    for step in (2, 4, 6):
        a = ckpt.read_state(ckpt.step_path(root, step))
        b = ckpt.read_state(ckpt.step_path(ref_root, step))
        for s in (a, b):  # all but the run's name, place, saving knobs and timings
            s.pop("ledger")
            for key in ("name", "cluster", "checkpoint"):
                s["spec"].pop(key)
        assert a == b, step
        files = ckpt.read_manifest(ckpt.step_path(root, step))["files"]
        assert files.keys() == ckpt.read_manifest(ckpt.step_path(ref_root, step))["files"].keys()
        for rel in files:  # DeepSpeed's files (optimizer shards too) and the RNG states
            if rel.endswith(".pt"):
                ours_sd = torch.load(
                    run_dir / "checkpoints" / f"step-{step}" / rel, weights_only=False
                )
                ref_sd = torch.load(
                    sync_run / "checkpoints" / f"step-{step}" / rel, weights_only=False
                )
                assert _equal(ours_sd, ref_sd), (step, rel)
    saves = _records(run_dir, "checkpoint")
    assert [r["step"] for r in saves] == [2, 4, 6]
    # the save's seconds are the loop's wait; the background write is counted apart
    assert all(r["save_seconds"] == r["blocked_seconds"] > 0 for r in saves)
    assert all(r["write_seconds"] > 0 for r in saves)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory, train_shards: Path) -> Path:
    """The reference's 6 steps with asynchronous saves (the default)."""
    storage = tmp_path_factory.mktemp("async-ckpt-runs")
    spec = parse_spec(_spec_data("async", storage, train_shards))
    run_dir = prepare_run(spec).local_path
    proc = _standalone(run_dir)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    return run_dir


def _productive(run_dir: Path, steps: set[int]) -> float:
    """Device-seconds of these steps' compute (2 ranks), as metrics.jsonl has them."""
    kept = {r["step"]: r for r in _records(run_dir, "step") if r["step"] in steps}
    assert kept.keys() == steps
    return 2 * sum(r["step_seconds"] - r["data_wait_seconds"] for r in kept.values())


@pytest.mark.slow
def test_an_async_run_s_ledger_bills_no_second_twice(async_run: Path, sync_run: Path) -> None:
    """Steps 2 and 4's saves are written while the next steps train; the ledger's checkpoint
    phase is the loop's wait for saves that metrics.jsonl reports, and its intervals never
    overlap, so its total is within the attempt's wall time."""
    saves = _records(async_run, "checkpoint")
    assert [r["step"] for r in saves] == [2, 4, 6]
    s = _check_ledger(async_run, sum(r["blocked_seconds"] for r in saves), devices=2)
    assert s.finished and s.seconds["lost"] == 0
    assert s.seconds["productive"] == pytest.approx(_productive(async_run, set(range(1, 7))))
    assert _losses(async_run) == _losses(sync_run)  # bitwise


@pytest.mark.slow
def test_a_save_in_flight_when_the_run_gives_up_is_committed_and_recorded(
    tmp_path: Path, train_shards: Path
) -> None:
    """Step 5's loss is NaN and no rollback is allowed (``train.max_rollbacks: 0``): the loop
    ends right after step 4's save began, before a step end could tell of it. The attempt's
    end waits for that save, which is committed, in metrics.jsonl and in the ledger like any
    other, so steps 1-4 are productive, not lost."""
    data = _spec_data("gives-up", tmp_path, train_shards)
    data["train"].update(test_nan_batches=[4], max_rollbacks=0)
    run_dir = prepare_run(parse_spec(data)).local_path  # type: ignore[arg-type]
    proc = _standalone(run_dir)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, log[-5000:]
    assert "checkpoint step-4 committed as the attempt ended (failed)" in log
    assert ckpt.committed_steps(location(run_dir / "checkpoints")) == [2, 4]
    saves = _records(run_dir, "checkpoint")
    assert [r["step"] for r in saves] == [2, 4]
    (attempt,), _ = read_attempts(run_dir)
    assert attempt.status == "failed"
    assert {r["step"] for r in attempt.records if r["kind"] == "checkpoint"} == {2, 4}
    s = _check_ledger(run_dir, sum(r["blocked_seconds"] for r in saves), devices=2)
    assert s.seconds["lost"] == 0
    assert s.seconds["productive"] == pytest.approx(_productive(run_dir, {1, 2, 3, 4}))
