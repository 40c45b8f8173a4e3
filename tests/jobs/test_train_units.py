"""Train job pieces that need no workers: LR schedule, checkpoint commit/verify/fallback and
retention, the per-rank plan and ``--dry-run``, and the driver's up-front checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crucible.cluster.plan import plan_run
from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError
from crucible.jobs.cli.train import app
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.run import check_resources, check_shards
from crucible.jobs.train.schedule import lr_at
from crucible.jobs.train.spec import OptimSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# --- LR schedule -----------------------------------------------------------------------


def test_warmup_then_cosine_to_the_floor() -> None:
    o = OptimSpec(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, o, 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in pairwise(lrs[10:]))  # monotone decay
    mid = 10 + (89 // 2)
    assert lrs[mid] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_constant_and_wsd() -> None:
    const = OptimSpec(lr=2e-3, warmup_steps=4, schedule="constant")
    assert [lr_at(s, const, 50) for s in (4, 20, 49)] == [2e-3] * 3
    wsd = OptimSpec(lr=1e-3, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0)
    lrs = [lr_at(s, wsd, 110) for s in range(110)]
    assert lrs[10:90] == [1e-3] * 80  # stable phase: 100 post-warmup steps, last 20 decay
    assert lrs[90] < 1e-3 and lrs[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in pairwise(lrs[90:]))


# --- checkpoints -----------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """A checkpoints directory on a local path and on an S3 bucket: one protocol."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return location(f"{s3.bucket('ckpt')}/{request.node.name}/checkpoints")
    return location(tmp_path / "checkpoints")


def _write_fake_save(root: Location, step: int, world: int, skip: str | None = None) -> Path:
    """The files a ``world``-rank ZeRO-3 save leaves in its stage (real bytes)."""
    stage = ckpt.stage_dir(root, step, "test")
    files = ["zero_to_fp32.py", "crucible_state/state.json"]
    for r in range(world):
        files += [
            f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
            f"crucible_state/rank-{r}.pt",
        ]
    for i, rel in enumerate(files):
        if rel == skip:
            continue
        p = stage / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([step % 256, i]) * (1000 + 37 * i))
    return stage


def _publish(root: Location, step: int, world: int, skip: str | None = None) -> dict:
    """Every rank's half of a save: write, hash and publish its files; the gathered digests."""
    ckpt.clear_for_save(root, step)
    stage = _write_fake_save(root, step, world, skip)
    files: dict = {}
    for r in range(world):  # each rank hashes and publishes what it wrote
        mine = ckpt.hash_own_files(stage, r, world)
        ckpt.publish_own(root, step, stage, mine)
        files |= mine
    return files


def _save(root: Location, step: int, world: int = 2) -> Location:
    return ckpt.commit(root, step, _publish(root, step, world), world)


def test_commit_writes_manifest_last_and_points_latest(root: Location) -> None:
    path = _save(root, 5)
    assert path.uri == (root / "step-5").uri and "step-5.tmp" not in root.ls()
    assert (root / "latest").read_text().strip() == "step-5"
    manifest = ckpt.read_manifest(path)
    assert set(manifest["files"]) == set(path.walk()) - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert entry["bytes"] == (path / rel).size()
        assert entry["sha256"] == (path / rel).sha256()
    assert manifest["total_bytes"] == sum(e["bytes"] for e in manifest["files"].values())
    assert ckpt.verify(path) is None


def test_every_ranks_shards_must_be_present_to_commit(root: Location) -> None:
    _save(root, 5)
    lost = "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    files = _publish(root, 10, 2, skip=lost)
    with pytest.raises(CrucibleError, match="zero_pp_rank_1_mp_rank_00_optim_states"):
        ckpt.commit(root, 10, files, 2)
    assert ckpt.committed_steps(root) == [5]
    assert (root / "latest").read_text().strip() == "step-5"


def test_truncated_shard_in_newest_falls_back_to_previous(root: Location, capsys) -> None:
    _save(root, 5)
    newest = _save(root, 10)
    shard = newest / "ds" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert ckpt.latest_valid(root).uri == (root / "step-5").uri  # type: ignore[union-attr]
    out = capsys.readouterr().out
    assert "skipping checkpoint step-10" in out and str(shard) in out


def test_same_size_corruption_is_caught_by_sha256_not_by_size(root: Location) -> None:
    _save(root, 5)
    newest = _save(root, 10)
    shard = newest / "ds" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.verify(newest, "size") is None
    assert "sha256" in (ckpt.verify(newest, "sha256") or "")
    assert ckpt.latest_valid(root, "sha256").uri == (root / "step-5").uri  # type: ignore[union-attr]


def test_each_rank_fetches_and_checks_only_its_own_files(root: Location) -> None:
    path = _save(root, 5)
    manifest = ckpt.read_manifest(path)
    mine = ckpt.owned_by(manifest["files"], 1, 2)
    assert mine and all("rank_1_" in f or "rank-1" in f for f in mine)
    local, bad = ckpt.fetch(path, mine, manifest)
    assert bad is None and all((local / f).is_file() for f in mine)
    victim = path / mine[0]
    data = bytearray(victim.read_bytes())
    data[3] ^= 0xFF
    victim.write_bytes(bytes(data))
    if not root.is_local:  # a fresh fetch (another node) reads the object again
        manifest = manifest | {"created": manifest["created"] + 1}
    _, bad = ckpt.fetch(path, mine, manifest)
    assert bad is not None and mine[0] in bad
    # rank 0's files are untouched: its own check passes (the group decision is the loop's)
    assert ckpt.fetch(path, ckpt.owned_by(manifest["files"], 0, 2), manifest)[1] is None


def test_a_save_that_died_before_its_manifest_is_skipped(root: Location) -> None:
    _save(root, 5)
    _publish(root, 10, 2)  # every rank's files are there, the manifest never came
    if root.is_local:
        os.replace(root.local_path / "step-10.tmp", root.local_path / "step-10")
    assert "manifest.json is missing" in (ckpt.verify(root / "step-10") or "")
    assert ckpt.latest_valid(root).uri == (root / "step-5").uri  # type: ignore[union-attr]
    _publish(root, 15, 2)  # an unfinished save is never a candidate
    assert ckpt.committed_steps(root) == [5]
    _save(root, 20)
    ckpt.retain(root, keep_last=2, keep_every=None)  # leftovers older than the newest go
    assert [n for n in root.ls() if n.startswith("step-")] == ["step-20", "step-5"]


_CHOOSE = """
import json, sys
import torch.distributed as dist
from crucible.cluster.storage import location
from crucible.jobs.train.checkpoint import choose_checkpoint
rank, init, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
got = choose_checkpoint(location(root), "sha256", rank, 2)
print(json.dumps(got[0].name if got else None))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes in a gloo group
def test_one_ranks_bad_file_moves_the_whole_group_back(root: Location, tmp_path: Path) -> None:
    """Each rank checks only its own files; rank 1's corrupt shard in step-10 makes both
    ranks load step-5, though rank 0's files of step-10 are intact (one decision)."""
    _save(root, 5)
    newest = _save(root, 10)
    victim = newest / "ds" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    init = f"file://{tmp_path / 'store'}"
    procs = []
    for r in (0, 1):  # two "nodes": a scratch directory each
        env = {**os.environ, "CRUCIBLE_SCRATCH": str(tmp_path / f"node{r}")}
        cmd = [sys.executable, "-c", _CHOOSE, str(r), init, root.uri]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [json.loads(o.strip().splitlines()[-1]) for o in outs] == ["step-5", "step-5"]
    # rank 0 says why, naming rank 1's file
    assert "skipping checkpoint step-10" in outs[0] and "rank_1_mp_rank_00_optim" in outs[0]


@pytest.mark.parametrize("zipfile", [True, False])
def test_save_hashed_digest_is_the_files_and_loads_back(tmp_path: Path, zipfile: bool) -> None:
    import torch

    from crucible.jobs.train.hashing_engine import save_hashed

    obj = {"big": torch.arange(600_000, dtype=torch.float32), "small": torch.ones(3), "n": 7}
    path = tmp_path / "x.pt"
    got = save_hashed(obj, path, zipfile)  # "big" (2.4 MB) is hashed on the second thread
    assert got == {"sha256": ckpt.sha256_file(path), "bytes": path.stat().st_size}
    back = torch.load(path, weights_only=True)
    assert torch.equal(back["big"], obj["big"]) and back["n"] == 7


def test_save_hashed_starts_writeback_of_every_written_stretch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from crucible.jobs.train import hashing_engine

    if hashing_engine._start_writeback() is None:
        pytest.skip("no sync_file_range on this platform")
    calls: list[tuple[int, int]] = []
    real = hashing_engine._start_writeback()

    def spy(fd: int, offset: int, nbytes: int) -> int:
        assert os.fstat(fd).st_size >= offset + nbytes  # only bytes already in the file
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(hashing_engine, "_WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(hashing_engine, "_start_writeback", lambda: spy)
    obj = [torch.arange(700_000, dtype=torch.float32) for _ in range(3)]  # 3 x 2.8 MB
    path = tmp_path / "x.pt"
    got = hashing_engine.save_hashed(obj, path)
    assert got == {"sha256": ckpt.sha256_file(path), "bytes": path.stat().st_size}
    assert len(calls) >= 3
    # consecutive, non-overlapping stretches from the start of the file
    assert [o for o, _ in calls] == [0] + [o + n for o, n in calls[:-1]]


def test_hash_own_files_trusts_recorded_digests_only_at_the_files_size(tmp_path: Path) -> None:
    tmp = _write_fake_save(location(tmp_path), 5, 1)
    rel = "ds/zero_pp_rank_0_mp_rank_00_model_states.pt"
    size = (tmp / rel).stat().st_size
    known = {os.path.abspath(tmp / rel): {"sha256": "recorded", "bytes": size}}
    assert ckpt.hash_own_files(tmp, 0, 1, known)[rel]["sha256"] == "recorded"
    (tmp / rel).write_bytes(b"changed after it was recorded")
    assert ckpt.hash_own_files(tmp, 0, 1, known)[rel]["sha256"] == ckpt.sha256_file(tmp / rel)


def test_retention_keeps_last_k_plus_every_m(root: Location) -> None:
    deleted = []
    for step in range(5, 55, 5):
        _save(root, step, world=1)
        deleted += ckpt.retain(root, keep_last=2, keep_every=20)
    assert ckpt.committed_steps(root) == [20, 40, 45, 50]
    assert sorted(deleted) == [5, 10, 15, 25, 30, 35]
    assert ckpt.latest_valid(root).uri == (root / "step-50").uri  # type: ignore[union-attr]


def test_retention_without_keep_every(root: Location) -> None:
    for step in (1, 2, 3, 4):
        _save(root, step, world=1)
    ckpt.retain(root, keep_last=3, keep_every=None)
    assert ckpt.committed_steps(root) == [2, 3, 4]


# --- plan, dry run, up-front checks ----------------------------------------------------


def test_plan_splits_the_global_batch(make_spec, tmp_path: Path) -> None:
    spec = make_spec("p", tmp_path, optim={"global_batch_size": 24, "micro_batch_size": 3})
    plan = plan_run(spec, 2, seq_len=64)
    assert (plan.grad_accum_steps, plan.tokens_per_step, plan.total_steps) == (4, 24 * 64, 20)
    assert plan.ds_config["train_batch_size"] == 24
    assert plan.ds_config["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(CrucibleError, match="multiple of optim.micro_batch_size 3 × 5 workers"):
        plan_run(spec, 5, seq_len=64)


def test_plan_from_token_budget(make_spec, tmp_path: Path) -> None:
    spec = make_spec("p", tmp_path, train={"max_steps": None, "max_tokens": 10_000})
    assert plan_run(spec, 2, seq_len=64).total_steps == math.ceil(10_000 / (16 * 64))


def test_gpt3_175b_dry_run_on_this_machine() -> None:
    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "gpt3-175b.yaml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "174,604,259,328 parameters" in r.output
    assert "global 1536 sequences × 2048 tokens" in r.output
    assert "micro-batch 2 × 1 accumulation steps × 768 ranks" in r.output
    config = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"]
    assert config["train_batch_size"] == 1536
    assert "torch_adam" not in config["optimizer"]["params"]  # fused Adam on GPUs
    # DeepSpeed's ZeRO-3 estimator (cluster/plan/memory.py): 18 bytes/param over 768 ranks
    # (the ZeRO paper's 16 plus fp32 gradients), the 4 × largest-layer gather buffer apart.
    assert "model states 3.81 GiB" in r.output and "gather buffer 2.30 GiB" in r.output


def test_tiny_example_dry_run() -> None:
    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "train-tiny.yaml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "micro-batch 4 × 2 accumulation steps × 2 ranks" in r.output


def test_run_refuses_a_data_spec() -> None:
    r = CliRunner().invoke(app, ["run", str(EXAMPLES / "data.yaml"), "--dry-run"])
    assert isinstance(r.exception, CrucibleError) and "needs kind: train" in str(r.exception)


def test_too_few_resources_is_an_error_not_a_hang(make_spec, tmp_path: Path) -> None:
    spec = make_spec("r", tmp_path, train={"num_workers": 4})
    with pytest.raises(CrucibleError, match=r"needs 4 CPU \(4 workers\) but the cluster has 2 CPU"):
        check_resources(spec, {"CPU": 2.0}, use_gpu=False)
    with pytest.raises(CrucibleError, match="4 GPU"):
        check_resources(spec, {"CPU": 64.0, "GPU": 2.0}, use_gpu=True)
    check_resources(spec, {"CPU": 4.0}, use_gpu=False)
    # a PPO run's separate frozen-model actors, on what its workers leave
    from crucible.jobs.train.run import check_worker_resources

    keys = ("num_actors", "cpus_per_actor")
    with pytest.raises(
        CrucibleError,
        match=r"needs 1 GPU \(1 actors\).*lower frozen.num_actors / frozen.cpus_per_actor",
    ):
        check_worker_resources(1, 1.0, {"CPU": 8.0, "GPU": 0.0}, True, "frozen", keys)


def test_shards_the_model_cannot_take_are_refused(make_spec, tmp_path: Path) -> None:
    check_shards(make_spec("ok", tmp_path))
    with pytest.raises(
        CrucibleError, match=r"\d+-token vocabulary but the model has vocab_size 256"
    ):
        check_shards(make_spec("v", tmp_path, model={"vocab_size": 256}))
    with pytest.raises(CrucibleError, match="max_seq_len is 32"):
        check_shards(make_spec("s", tmp_path, model={"max_seq_len": 32}))
    with pytest.raises(CrucibleError):
        check_shards(make_spec("m", tmp_path, data={"shards": str(tmp_path / "nope")}))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9.0a", "9.0"),  # what the H100 image this was found on sets
        ("8.0 9.0a+PTX", "8.0 9.0+PTX"),
        ("8.0;9.0a;10.0a;12.0f", "8.0;9.0;10.0;12.0"),
        ("7.0 8.0 8.6+PTX", "7.0 8.0 8.6+PTX"),
    ],
)
def test_cuda_arch_list_without_variant_suffixes_for_deepspeed(given: str, expected: str) -> None:
    from crucible.jobs.train.environment import deepspeed_arch_list

    assert deepspeed_arch_list(given) == expected
