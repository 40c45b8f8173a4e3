"""ZeRO stages other than 3 checkpoint, resume and export: their files differ (one
``mp_rank_00_model_states.pt`` written by rank 0, per-rank optimizer shards from stage 1,
none under stage 0), and the commit, the per-rank fetch and the export follow them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from crucible.cluster.storage import Location
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.export import consolidate


def _spec(name: str, storage: str, shards: Path, stage: int) -> TrainRunSpec:
    spec = parse_spec({
        "kind": "train", "name": name, "cluster": {"storage": storage},
        "model": {"preset": "tiny", "parallel": {"zero_stage": stage}},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": 16, "micro_batch_size": 4, "warmup_steps": 2,
                  "lr": 1e-3},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "train": {"num_workers": 2, "max_steps": 4},
    })  # fmt: skip
    assert isinstance(spec, TrainRunSpec)
    return spec


def _losses(run: Location) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "storage"), [(0, "local"), (2, "s3")], ids=["stage0-local", "stage2-s3"]
)
def test_zero_stage_checkpoint_resumes_bitwise_and_exports(
    stage: int,
    storage: str,
    train_shards: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    standalone: Callable[[str], str],
) -> None:
    """4 steps with a checkpoint every 2; step-4 is set aside and the run resumed from step-2
    retrains steps 3 and 4 with the same losses and the same final weights, bit for bit
    (same world size, CPU). From the object store, the model states rank 0 wrote are fetched
    for the resume (both ranks share this node's scratch; that each rank's fetch list holds
    them, as a rank on another node needs, is the next test's)."""
    root = str(tmp_path)
    if storage == "s3":
        root = f"{request.getfixturevalue('s3').bucket('zero')}/{request.node.name}"
    spec = _spec(f"zero{stage}", root, train_shards, stage)
    run = prepare_run(spec)
    standalone(run.uri)
    checkpoints = run / "checkpoints"
    assert ckpt.committed_steps(checkpoints) == [2, 4]
    manifest = ckpt.read_manifest(checkpoints / "step-4")
    ds_files = sorted(f for f in manifest["files"] if f.startswith("ds/"))
    if stage == 0:
        assert ds_files == ["ds/mp_rank_00_model_states.pt"]
    else:
        assert "ds/mp_rank_00_model_states.pt" in ds_files and len(ds_files) == 3
    first, _ = consolidate(checkpoints / "step-4")
    (checkpoints / "step-4").rmtree()
    before = _losses(run)

    prepare_run(spec, resume=True)
    standalone(run.uri)
    again, _ = consolidate(checkpoints / "step-4")
    after = _losses(run)[len(before) :]
    assert [s for s, _ in after] == [3, 4]  # resumed from step-2
    assert after == before[2:]
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(v.dtype == torch.float32 for v in first.values())


def test_commit_follows_the_files_of_each_zero_stage() -> None:
    rng = [f"crucible_state/rank-{r}.pt" for r in range(2)]
    optim = [f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    model3 = [f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)]
    model = ["ds/mp_rank_00_model_states.pt"]
    assert ckpt.missing_rank_files(set(rng + model), 2) == []  # stage 0
    assert ckpt.missing_rank_files(set(rng + model + optim), 2) == []  # stages 1-2
    assert ckpt.missing_rank_files(set(rng + model3 + optim), 2) == []  # stage 3
    assert ckpt.missing_rank_files(set(rng + model + optim[:1]), 2) == [optim[1]]
    assert ckpt.missing_rank_files(set(rng + optim), 2) == model
    assert ckpt.missing_rank_files(set(rng + model3[:1] + optim), 2) == [model3[1]]
    assert ckpt.missing_rank_files(set(rng[1:] + model), 2) == [rng[0]]
    # rank 0 wrote the shared model states; from an object store every rank fetches them
    assert ckpt.owned_by(model + optim, 1, 2) == [optim[1]]
    assert ckpt.shared_files(model + optim + model3) == model
