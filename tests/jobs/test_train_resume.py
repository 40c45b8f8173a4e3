"""The train job end to end on the session cluster (Ray Jobs API → Ray Train → DeepSpeed
ZeRO-3 on 2 CPU workers over gloo): checkpoints with every rank's shards, the TensorBoard and
W&B loggers, bitwise exact resume after a SIGKILLed worker, world-size change 2 → 1 → 2,
export to transformers. One reference run serves every test of the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crucible.cluster.storage import location
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.export import consolidate, export_checkpoint, load_model

pytestmark = pytest.mark.slow

# World-size change: the same global batches in the same order (asserted exactly), but the
# sums are reordered. The first step after loading sees exactly the saved weights and samples;
# only its reported loss, the fp32 mean of 4 micro-batch means, is summed in another order
# ((a+b)/2 + (c+d)/2)/2 against (a+b+c+d)/4: a few ulp (one ulp at 5.12 is 9e-8 relative;
# one CPU gave 1 ulp, another 0). Later steps also reduce gradients over a different number
# of ranks and micro-batches, so bf16 rounding differs: at most 6e-4 relative over 10 steps
# after the change on the tiny model.
FIRST_STEP_RTOL = 1e-6
RESHARD_RTOL = 2e-3

STEPS = 12
EVERY = 3  # checkpoints at 3, 6, 9, 12; kept: the last 2 (9, 12) plus every 6th (6, 12)
BATCH = 16


@pytest.fixture(scope="module")
def env(local_cluster, tmp_path_factory) -> Iterator[Path]:
    """CRUCIBLE_HOME pointing at the session cluster for this module; the storage root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
        yield tmp_path_factory.mktemp("train-runs")


def train(spec: TrainRunSpec, resume: bool = False, during=None) -> tuple[Path, str]:
    """Submit ``spec`` as a Ray job, wait for it; return (run dir, job log)."""
    from crucible.jobs.submit import submit_run

    client, job_id, run = submit_run(spec, resume=resume)
    run_dir = run.local_path  # these runs' storage is a local path
    worker = threading.Thread(target=during, args=(run_dir,), daemon=True) if during else None
    if worker:
        worker.start()
    log = "".join(client.follow(job_id))
    if worker:
        worker.join(timeout=60)
    status = str(client.status(job_id))
    assert status.endswith("SUCCEEDED"), log[-5000:]
    return run_dir, log


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss of each step; after a resume the re-run steps' later records win."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            out[rec["step"]] = rec["loss"]
    return out


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def branch(src: Path, spec: TrainRunSpec, at_step: int) -> TrainRunSpec:
    """A copy of run ``src`` as run ``spec.name`` whose newest checkpoint is ``at_step``."""
    dst = Path(spec.cluster.storage) / spec.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ray", "workers", "jobs.jsonl"))
    for step in ckpt.committed_steps(location(dst / "checkpoints")):
        if step > at_step:
            shutil.rmtree(dst / "checkpoints" / f"step-{step}")
    shutil.rmtree(dst / "checkpoints" / "universal", ignore_errors=True)
    (dst / "checkpoints" / "latest").write_text(f"step-{at_step}\n")
    return spec


def with_workers(spec: TrainRunSpec, n: int) -> TrainRunSpec:
    data = spec.model_dump(mode="json")
    data["train"]["num_workers"] = n
    return parse_spec(data)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def reference(env: Path, train_shards: Path) -> tuple[Path, str]:
    """An uninterrupted 2-worker run of STEPS steps, checkpoints every EVERY, with both
    loggers."""
    data = _spec_data("ref", env, train_shards)
    data["monitoring"] = {"loggers": ["tensorboard", "wandb"]}
    return train(parse_spec(data))  # type: ignore[arg-type]


def _spec_data(name: str, storage: Path, shards: Path) -> dict:
    return {
        "kind": "train",
        "name": name,
        "cluster": {"storage": str(storage)},
        "model": {"preset": "tiny"},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": BATCH, "micro_batch_size": 4, "warmup_steps": 5,
                  "lr": 1e-3},
        "checkpoint": {"every_steps": EVERY, "keep_last": 2, "keep_every": 2 * EVERY},
        "train": {"num_workers": 2, "max_steps": STEPS, "eval_every": 2 * EVERY,
                  "eval_batches": 1},
    }  # fmt: skip


def test_steps_are_reported_and_every_rank_is_in_every_checkpoint(reference) -> None:
    run_dir, log = reference
    for field in ("loss", "lr", "grad_norm", "tokens", "tok/s"):
        assert f"step {STEPS}/{STEPS} " in log and field in log
    steps = records(run_dir, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["tokens"] == BATCH * 64 and r["step_seconds"] > 0 for r in steps)
    assert all(0 < r["engine_seconds"] < r["step_seconds"] for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
    assert [r["step"] for r in steps if "heldout_loss" in r] == [6, 12]
    root = location(run_dir / "checkpoints")
    assert ckpt.committed_steps(root) == [6, 9, 12]  # last 2 + every 6th
    assert (root / "latest").read_text().strip() == f"step-{STEPS}"
    for step in (6, 9, 12):
        path = ckpt.step_path(root, step)
        manifest = ckpt.read_manifest(path)
        assert manifest["world_size"] == 2
        for r in (0, 1):
            for name in (
                f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                f"crucible_state/rank-{r}.pt",
            ):
                assert name in manifest["files"], name
        assert ckpt.verify(path, "sha256") is None
        state = ckpt.read_state(path)
        assert state["step"] == step and state["samples_consumed"] == BATCH * step
        assert state["spec"]["name"] == "ref" and state["ledger"]["worker_seconds"] > 0
    saves = records(run_dir, "checkpoint")
    assert saves and all(s["bytes"] > 0 and s["save_seconds"] > 0 for s in saves)


def test_loggers_hold_the_steps_of_metrics_jsonl(reference) -> None:
    """TensorBoard's scalars are metrics.jsonl's values (stored as float32); W&B wrote an
    offline run under the run directory."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = reference
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    steps = records(run_dir, "step")
    for tag, key in (
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("eval/heldout_loss", "heldout_loss"),
    ):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(r["step"], float(np.float32(r[key]))) for r in steps if key in r]
        assert got == want, tag
    (offline,) = (run_dir / "wandb" / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    assert log.stat().st_size > 0


def _kill_rank1_after(step: int, seen: dict):
    """SIGKILL rank 1 once checkpoint ``step`` is committed (the run's own progress)."""

    def kill(run_dir: Path) -> None:
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 600  # a bound on a broken run, not on the code's speed
        while time.monotonic() < deadline:
            if latest.exists() and latest.read_text().strip() == f"step-{step}":
                pid = int((run_dir / "workers" / "rank-1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                seen["killed"] = pid
                return
            time.sleep(0.02)

    return kill


def test_sigkilled_worker_resumes_bitwise_identical(env, train_shards, reference) -> None:
    ref_dir, _ = reference
    spec = parse_spec(_spec_data("killed", env, train_shards))
    seen: dict = {}
    run_dir, log = train(spec, during=_kill_rank1_after(2 * EVERY, seen))  # type: ignore[arg-type]
    assert "killed" in seen  # killed once step-6 was committed, before the run ended
    resumes = records(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 2 * EVERY, log[-3000:]
    assert step_losses(run_dir) == step_losses(ref_dir)  # every step, bitwise
    ours, _ = consolidate(ckpt.step_path(location(run_dir / "checkpoints"), STEPS))
    theirs, _ = consolidate(ckpt.step_path(location(ref_dir / "checkpoints"), STEPS))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_torchrun_runs_the_same_loop_and_resumes_bitwise(env, train_shards, reference) -> None:
    """The standalone launcher (torchrun, no Ray: what the GPU check uses) resumes a copy of
    the reference at step 6 and trains steps 7-12 exactly as Ray Train did."""
    import subprocess
    import sys

    ref_dir, _ = reference
    spec = branch(ref_dir, parse_spec(_spec_data("torchrun", env, train_shards)), 2 * EVERY)  # type: ignore[arg-type]
    run_dir = Path(spec.cluster.storage) / spec.name
    out = subprocess.run(
        [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir), "--nproc", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert f"step {STEPS}: loss" in out.stdout
    resumes = records(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 2 * EVERY
    assert step_losses(run_dir) == step_losses(ref_dir)  # steps 7-12 trained here, bitwise
    assert STEPS in ckpt.committed_steps(location(run_dir / "checkpoints"))


def test_world_size_2_to_1_and_1_to_2(env, train_shards, reference, standalone) -> None:
    """Exact: the samples each step consumes. Within tolerances: the losses.

    The resumes run under torchrun, the loop Ray Train runs, converting the checkpoint in
    the launcher as the Ray driver does in a task (the PPO test resumes a Ray job on another
    world size)."""
    from crucible.jobs.runs import prepare_run

    def train_on(spec: TrainRunSpec) -> tuple[Path, str]:
        run = prepare_run(spec, resume=True)
        return run.local_path, standalone(run.uri, spec.train.num_workers)

    ref_dir, _ = reference
    ref = step_losses(ref_dir)
    at = 2 * EVERY
    spec21 = with_workers(parse_spec(_spec_data("ws21", env, train_shards)), 1)  # type: ignore[arg-type]
    run21, log = train_on(branch(ref_dir, spec21, at))
    assert f"converted step-{at} (2 ranks) to a universal checkpoint for 1 ranks" in log
    got = step_losses(run21)
    assert got[at + 1] == pytest.approx(ref[at + 1], rel=FIRST_STEP_RTOL)
    for s in range(at + 2, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=RESHARD_RTOL), s
    assert (
        ckpt.read_manifest(ckpt.step_path(location(run21 / "checkpoints"), STEPS))["world_size"]
        == 1
    )
    assert_same_data_position(run21, ref_dir)

    at = 3 * EVERY
    spec12 = with_workers(parse_spec(_spec_data("ws12", env, train_shards)), 2)  # type: ignore[arg-type]
    run12, log = train_on(branch(run21, spec12, at))
    assert f"converted step-{at} (1 ranks) to a universal checkpoint for 2 ranks" in log
    got = step_losses(run12)
    for s in range(at + 1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=RESHARD_RTOL), s
    assert (
        ckpt.read_manifest(ckpt.step_path(location(run12 / "checkpoints"), STEPS))["world_size"]
        == 2
    )
    assert_same_data_position(run12, ref_dir)


def test_a_graceful_stop_saves_its_step_and_resume_goes_on_from_it(env, train_shards) -> None:
    """`crucible jobs stop` on a train run: the ranks finish the step during which the stop
    was asked for, save it and exit, all before it returns; the ledger says stopped; a resume
    continues from that step."""
    from crucible.jobs.client import TERMINAL
    from crucible.jobs.stop import stop_job
    from crucible.jobs.submit import submit_run
    from crucible.monitoring.ledger_format import read_attempts

    data = _spec_data("stopped", env, train_shards)
    data["train"]["max_steps"] = 500  # far more than it will run
    spec = parse_spec(data)
    client, job_id, run = submit_run(spec)  # type: ignore[arg-type]
    run_dir = run.local_path
    deadline = time.monotonic() + 600
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and max(step_losses(run_dir), default=0) >= 2):
        assert time.monotonic() < deadline, "no step 2 within 600 s"
        assert client.status(job_id) not in TERMINAL, client.logs(job_id)
        time.sleep(0.2)
    said = stop_job(client, job_id)
    assert client.status(job_id) in TERMINAL  # the job has ended when stop returns
    stopped_at = max(step_losses(run_dir))
    assert 2 <= stopped_at < 500 and f"stopped at step {stopped_at} (saved)" in said, said
    latest = ckpt.latest_committed(location(run_dir / "checkpoints"))
    assert latest is not None and latest[0].name == f"step-{stopped_at}"  # its step is saved
    assert "stopped on request" in client.logs(job_id)
    attempts, _ = read_attempts(location(run_dir))
    assert attempts[-1].status == "stopped", attempts

    data["train"]["max_steps"] = stopped_at + 1
    run_dir, _ = train(parse_spec(data), resume=True)  # type: ignore[arg-type]
    (resume,) = records(run_dir, "resume")
    assert resume["step"] == stopped_at  # not stopped again by the old request
    assert max(step_losses(run_dir)) == stopped_at + 1


def assert_same_data_position(run: Path, ref: Path) -> None:
    """Exact: at every checkpoint both runs hold, the run has consumed the same samples as the
    reference (the reader's whole state), and every step read a whole global batch."""
    ours_root, ref_root = location(run / "checkpoints"), location(ref / "checkpoints")
    common = set(ckpt.committed_steps(ours_root)) & set(ckpt.committed_steps(ref_root))
    assert STEPS in common
    for step in sorted(common):
        ours = ckpt.read_state(ckpt.step_path(ours_root, step))
        theirs = ckpt.read_state(ckpt.step_path(ref_root, step))
        assert ours["samples_consumed"] == theirs["samples_consumed"] == BATCH * step
        assert ours["reader"] == theirs["reader"]
    assert {r["tokens"] for r in records(run, "step")} == {BATCH * 64}


def test_export_to_transformers_and_torch(reference, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, _ = reference
    model = load_model(run_dir)  # the newest valid checkpoint: the last step's
    sd, cfg = consolidate(ckpt.step_path(location(run_dir / "checkpoints"), STEPS))
    assert cfg.n_layers == 2 and torch.equal(model.tok_emb.weight, sd["tok_emb.weight"])

    out = export_checkpoint(run_dir / "checkpoints" / f"step-{STEPS}", "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)[0]).abs().max().item()
    assert diff <= 1e-4, diff
    assert (out / "tokenizer.json").exists()

    pt = export_checkpoint(run_dir, "torch", tmp_path / "w.pt", dtype="bf16")
    loaded = torch.load(pt)
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    assert torch.equal(
        loaded["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"].bfloat16()
    )
    assert json.loads(pt.with_name("w.pt.config.json").read_text())["d_model"] == 64
