"""Loss-spike and NaN rollback: the detector, the reader's skips, the ledger's and Prometheus'
accounts, and the train job's own loop on 2 gloo ranks under torchrun (no Ray), where
``train.test_nan_batches`` / ``train.test_spike_batches`` spoil the loss of chosen global
batches inside the real forward pass. One poisoned run and one reference run that skips the
same batches from the start (``data.skip_batches``) serve the multi-process tests."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from crucible.cluster.storage import location
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.jobs.resume_check import SAFE_ON_RESUME
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks.rollback import SpikeDetector
from crucible.jobs.train.spec import TrainSpec
from crucible.monitoring.ledger import LedgerCollector, LedgerWriter, account
from crucible.monitoring.metrics import TrainMetrics

BATCH = 16
NAN_BATCH, SPIKE_BATCH = 4, 8  # read by steps 5 and 8 once batch 4 is skipped
EVERY = 3  # checkpoints at 3, 6, 9, 10 (all kept)


# -- the detector -------------------------------------------------------------------------


def test_default_detector_stays_quiet_on_a_noisy_healthy_run() -> None:
    """A loss falling from 8 to ~2.5 with per-step noise, bumps and a plateau: no verdict."""
    t = TrainSpec(max_steps=1)
    det = SpikeDetector(t.spike_window, t.spike_zscore, t.spike_ratio)
    rng = random.Random(0)
    for step in range(1, 20_001):
        loss = 2.5 + 5.5 * math.exp(-step / 300) + rng.gauss(0, 0.04)
        loss += 0.15 if step % 997 < 5 else 0.0  # a harder stretch of data now and then
        assert det.judge(loss, grad_norm=rng.uniform(0.2, 3.0)) is None, step
        det.add(step, loss)


def test_detector_catches_non_finite_values_and_a_spike_and_forgets_undone_steps() -> None:
    det = SpikeDetector(window=4, zscore=6.0, ratio=1.2)
    assert det.judge(math.nan, 1.0) == "loss became nan"
    assert det.judge(5.0, math.inf) == "grad norm became inf (loss 5.0000)"
    assert det.judge(5.0, None) is None  # an engine without a norm
    assert det.judge(50.0, 1.0) is None  # nothing to compare with until the window is full
    for step, loss in enumerate([5.0, 4.9, 5.1, 5.0], start=1):
        det.add(step, loss)
    assert det.judge(5.5, 1.0) is None  # many sigmas up, but within the ratio
    why = det.judge(6.5, 1.0)
    assert why is not None and why.startswith("loss spiked to 6.5000")
    det.forget_after(2)
    assert [s for s, _ in det.losses] == [1, 2] and det.judge(50.0, 1.0) is None


# -- the reader ----------------------------------------------------------------------------


def test_reader_steps_over_skipped_batches(train_shards: Path) -> None:
    plain = TrainingReader(train_shards, BATCH, verify="size")
    skipping = TrainingReader(train_shards, BATCH, rank=1, world_size=2, verify="size")
    skipping.skip([1, 2])
    assert skipping.last_batch == -1
    got = skipping.next_batch()
    assert skipping.last_batch == 0
    got = skipping.next_batch()  # batches 1 and 2 are stepped over
    assert skipping.last_batch == 3 and skipping.samples_consumed == 4 * BATCH
    assert got["sample_index"].tolist() == plain.global_batch_indices(3)[BATCH // 2 :].tolist()
    skipping.skip([0])  # already read: no effect
    skipping.next_batch()
    assert skipping.last_batch == 4
    state = skipping.state_dict()
    assert state["samples_consumed"] == 5 * BATCH  # the position is still one integer


# -- the ledger and Prometheus -------------------------------------------------------------


def test_ledger_bills_the_bad_step_the_reload_and_the_undone_steps_to_rollback(
    tmp_path: Path,
) -> None:
    """Two devices, 1 s steps: steps 1-2, checkpoint 2, steps 3-4, the bad step 5 and the
    reload (1 s in all) back to 2, steps 3-4 again, checkpoint 4."""
    w = LedgerWriter(tmp_path, 2, start_time=0.0)
    w.startup_done(1.0)
    w.step(1, 1, 2)
    w.step(2, 2, 3)
    w.checkpoint(2, 3, 3.5)
    w.step(3, 3.5, 4.5)
    w.step(4, 4.5, 5.5)
    w.interval("rollback", 5.5, 6.5, step=2, from_step=4)
    w.step(3, 6.5, 7.5)
    w.step(4, 7.5, 8.5)
    w.checkpoint(4, 8.5, 9.0)
    w.close()
    s = account(tmp_path, now=9.0)
    assert s.seconds["productive"] == pytest.approx(4 * 2)  # steps 1-4 once each
    assert s.causes["rollback"] == pytest.approx(3 * 2)  # steps 3-4 undone + the bad one
    assert s.seconds["lost"] == pytest.approx(3 * 2) and s.causes["lost"] == 0
    assert sum(s.badput.values()) == pytest.approx(s.total_seconds - s.causes["productive"])
    reg = CollectorRegistry()
    reg.register(LedgerCollector(tmp_path))
    got = reg.get_sample_value("crucible_gpu_badput_seconds_total", {"cause": "rollback"})
    assert got == pytest.approx(6)


def test_rollback_counters_are_crucible_totals_on_rank_0() -> None:
    m = TrainMetrics(1.0, 1.0, num_devices=2, peak_flops_per_device=1.0, rank=0)
    m.on_rollback(32, rollbacks=2)  # an attempt starting after two rollbacks
    m.on_rollback(16)
    get = m.registry.get_sample_value
    assert get("crucible_train_rollbacks_total") == 3
    assert get("crucible_train_skipped_samples_total") == 48
    other = TrainMetrics(1.0, 1.0, num_devices=2, peak_flops_per_device=1.0, rank=1)
    other.on_rollback(16)
    assert other.registry.get_sample_value("crucible_train_rollbacks_total") is None


def test_rollback_knobs_may_change_on_resume_and_the_poison_may_not() -> None:
    t = TrainSpec(max_steps=1)
    assert (t.max_rollbacks, t.rollback_skip_batches, t.spike_window) == (3, 1, 100)
    for key in ("train.max_rollbacks", "train.spike_zscore", "data.skip_batches"):
        assert key in SAFE_ON_RESUME
    assert not any(k.startswith("train.test_") for k in SAFE_ON_RESUME)


# -- the train job's loop on 2 gloo ranks --------------------------------------------------


def _spec(name: str, storage: Path, shards: Path, train: dict[str, Any],
          data: dict[str, Any] | None = None) -> TrainRunSpec:  # fmt: skip
    spec = parse_spec({
        "kind": "train", "name": name, "cluster": {"storage": str(storage)},
        "model": {"preset": "tiny"}, "data": {"shards": str(shards), **(data or {})},
        "optim": {"global_batch_size": BATCH, "micro_batch_size": 4, "warmup_steps": 5,
                  "lr": 1e-3},
        "checkpoint": {"every_steps": EVERY, "keep_last": 4},
        "train": {"num_workers": 2, "max_steps": 10, "spike_window": 3, **train},
    })  # fmt: skip
    assert isinstance(spec, TrainRunSpec)
    return spec


def standalone(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """The train job's loop on 2 CPU ranks under torchrun (no Ray)."""
    return subprocess.run(
        [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir), "--nproc", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def train(spec: TrainRunSpec) -> tuple[Path, str]:
    run_dir = prepare_run(spec).local_path
    out = standalone(run_dir)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return run_dir, out.stdout


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss of each step; where a step was trained again, its last record wins."""
    return {r["step"]: r["loss"] for r in records(run_dir, "step")}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rollback-runs")


@pytest.fixture(scope="module")
def rolled(storage: Path, train_shards: Path) -> tuple[Path, str]:
    """10 steps; global batch 4 turns the loss NaN, global batch 8 multiplies it by 100."""
    poison = {"test_nan_batches": [NAN_BATCH], "test_spike_batches": [SPIKE_BATCH]}
    return train(_spec("rolled", storage, train_shards, poison))


@pytest.fixture(scope="module")
def reference(storage: Path, train_shards: Path) -> tuple[Path, str]:
    """The same run on data that never held the two batches."""
    skip = {"skip_batches": [NAN_BATCH, SPIKE_BATCH]}
    return train(_spec("reference", storage, train_shards, {}, skip))


@pytest.mark.slow
def test_a_nan_and_a_spike_are_each_rolled_back_once_and_skipped(rolled, train_shards) -> None:
    run_dir, log = rolled
    rbs = records(run_dir, "rollback")
    assert [(r["step"], r["to_step"], r["skipped_batches"]) for r in rbs] == [
        (5, 3, [NAN_BATCH]),  # step 5 read batch 4: back to step-3
        (8, 6, [SPIKE_BATCH]),  # step 8 read batch 8 (4 skipped): back to step-6
    ]
    assert rbs[0]["loss"] is None and rbs[0]["why"] == "loss became nan"
    assert rbs[1]["loss"] > 100 and rbs[1]["why"].startswith("loss spiked to")
    assert all(r["skipped_samples"] == BATCH for r in rbs)
    assert "step 5: loss became nan; rolled back to step-3 and skipping global batch 4" in log
    assert "step 10/10 loss" in log
    assert [r["step"] for r in records(run_dir, "step")] == [1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10]
    assert not (run_dir / "nan.json").exists()
    # the run's record of the skipped data: batches, stream positions, the split's samples
    logged = [json.loads(line) for line in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    assert [r["skip"] for r in logged] == [
        [NAN_BATCH, NAN_BATCH + 1],
        [SPIKE_BATCH, SPIKE_BATCH + 1],
    ]
    reader = TrainingReader(train_shards, BATCH, verify="size")
    for r in logged:  # what `crucible data trace SHARDS INDEX` takes
        assert r["sample_indices"] == reader.global_batch_indices(r["batch_index"]).tolist()


@pytest.mark.slow
def test_after_rollback_losses_and_weights_are_bitwise_the_run_that_skipped_them(
    rolled, reference
) -> None:
    run_dir, _ = rolled
    ref_dir, _ = reference
    assert records(ref_dir, "rollback") == []  # the detector stays quiet on the clean run
    assert step_losses(run_dir) == step_losses(ref_dir)  # all 10 steps, bitwise
    from crucible.jobs.train.export import consolidate

    ours, _ = consolidate(ckpt.step_path(location(run_dir / "checkpoints"), 10))
    theirs, _ = consolidate(ckpt.step_path(location(ref_dir / "checkpoints"), 10))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    for step in (6, 9, 10):  # the same data position (samples consumed, skips included)
        a = ckpt.read_state(ckpt.step_path(location(run_dir / "checkpoints"), step))
        b = ckpt.read_state(ckpt.step_path(location(ref_dir / "checkpoints"), step))
        assert a["reader"] == b["reader"]


@pytest.mark.slow
def test_the_ledger_bills_the_bad_steps_reloads_and_undone_steps_to_rollback(rolled) -> None:
    run_dir, _ = rolled
    s = account(run_dir)
    steps = records(run_dir, "step")
    undone = [steps[3], steps[7]]  # the first passes of steps 4 and 7
    assert [r["step"] for r in undone] == [4, 7]
    wasted = sum(r["step_seconds"] for r in undone)
    wasted += sum(r["seconds"] for r in records(run_dir, "rollback"))  # bad step + reload
    assert s.finished and s.causes["rollback"] == pytest.approx(2 * wasted)
    kept = {r["step"]: r for r in steps}.values()  # the last pass of each step
    useful = sum(r["step_seconds"] - r["data_wait_seconds"] for r in kept)
    assert s.causes["productive"] == pytest.approx(2 * useful)
    assert s.causes["lost"] == 0


@pytest.mark.slow
def test_a_resume_from_before_a_bad_batch_skips_it_again(rolled, reference, tmp_path: Path) -> None:
    """A copy of the poisoned run resumed at step 6 (the spike's batch 8 still ahead, and
    still poisoned in its spec) reads the run's rollback log and never sees batch 8."""
    src, _ = rolled
    ref_dir, _ = reference
    run_dir = tmp_path / "resumed"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("workers"))
    for step in (9, 10):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step}")
    (run_dir / "checkpoints" / "latest").write_text("step-6\n")
    before = len(records(run_dir, "rollback"))
    out = standalone(run_dir)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    (resume,) = records(run_dir, "resume")
    assert resume["step"] == 6
    assert len(records(run_dir, "rollback")) == before  # no new rollback: batch 8 skipped
    assert step_losses(run_dir) == step_losses(ref_dir)


@pytest.mark.slow
def test_one_rollback_too_many_stops_the_run_with_one_line(train_shards, tmp_path) -> None:
    """Batches 1 and 2 are both NaN and one rollback is allowed: step 2 goes back to step-1
    skipping batch 1, then reads batch 2 and the run stops."""
    spec = _spec("gives-up", tmp_path, train_shards,
                 {"test_nan_batches": [1, 2], "max_rollbacks": 1, "max_steps": 3})  # fmt: skip
    data = spec.model_dump(mode="json")
    data["checkpoint"]["every_steps"] = 1
    run_dir = prepare_run(parse_spec(data)).local_path
    out = standalone(run_dir)
    assert out.returncode == 2, (out.stdout + out.stderr)[-5000:]
    assert "error: loss became nan at step 2; stopped; last good checkpoint" in out.stderr
    info = json.loads((run_dir / "nan.json").read_text())
    assert info["batch_index"] == 2 and info["step"] == 2
    assert info["gave_up"] == (
        "1 rollback(s) in the last 1000 steps already, train.max_rollbacks 1"
    )
    lines = (run_dir / "rollbacks.jsonl").read_text().splitlines()
    assert [json.loads(line)["skip"] for line in lines] == [[1, 2]]
    assert [r["step"] for r in records(run_dir, "step")] == [1]
