"""Asynchronous checkpoint saves (``checkpoint.async_save``): host copies that write the files
``torch.save`` would have written at the time of the copy, one save in flight at most, the
checkpointer waiting for the previous save before the next and at the end of the run, and on
2 gloo ranks: an asynchronous save committing the very files of a synchronous one while the
engine trains on, and a run killed while a save is in flight resuming bitwise from the
checkpoint before it."""

from __future__ import annotations

import io
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

from crucible.cluster.storage import location
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks import checkpointer as checkpointer_mod
from crucible.jobs.train.callbacks.checkpointer import CheckpointerCallback
from crucible.jobs.train.checkpoint import async_save
from crucible.jobs.train.checkpoint.host_copy import HostBuffers, host_copy
from crucible.jobs.train.checkpoint.in_flight import IN_FLIGHT, SaveSlot
from crucible.jobs.train.export import consolidate

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
        return async_save.Snapshot(step, tmp_path, [], {}, state, True, time.perf_counter(), 0)

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
        return async_save.Snapshot(step, tmp_path, [], {}, state, True, time.perf_counter(), 0)

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
    assert all(0 < r["write_seconds"] < r["save_seconds"] for r in saves)
    # the loop waited for the copy only, except at the last step, which waits for the commit
    assert all(0 < r["blocked_seconds"] < r["save_seconds"] for r in saves[:-1])
