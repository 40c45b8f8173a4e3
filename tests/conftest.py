"""Suite-wide fixtures: a real local cluster (Ray head + Prometheus) shared by the session."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.cluster import local
from crucible.cluster.local import free_ports
from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.monitoring.prometheus import rule_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from drill import S3Server, s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where torch sees a CUDA GPU and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (make gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _ensure_prometheus() -> None:
    """Tests use a real Prometheus: install the Debian package where it is missing."""
    if shutil.which("prometheus"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("prometheus is not installed and cannot be installed here (need root + apt)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "prometheus"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def short_tmpdir(prefix: str) -> Path:
    """A short directory under /tmp: Ray's unix socket paths must stay short."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[local.ClusterState]:
    """One local cluster for the whole session, on free ports, in a private state dir."""
    _ensure_prometheus()
    state_dir = short_tmpdir("crt")
    state, started = local.up(
        state_dir / "cluster", free_ports(), num_cpus=2, rule_files=rule_files()
    )
    assert started
    try:
        yield state
    finally:
        local.down(Path(state.state_dir))
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def cluster_env(local_cluster: local.ClusterState, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point `crucible` (in-process and subprocesses) at the session cluster."""
    home = Path(local_cluster.state_dir).parent
    monkeypatch.setenv("CRUCIBLE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def cluster_data_run(local_cluster: local.ClusterState) -> Iterator[dict[str, Any]]:
    """One data job on the session cluster, submitted as a user does (``crucible data run``
    from the spec's directory, storage relative to it): the jobs tests check the CLI around
    it, the monitoring tests train on its shards and query its metrics."""
    import yaml

    from crucible.data_pipeline.sample import generate_corpus

    cwd = Path(tempfile.mkdtemp(prefix="crucible-data-run-"))
    generate_corpus(cwd / "corpus", n_docs=120, seed=5, files=2)
    spec = {
        "kind": "data",
        "name": "mon-data",
        "cluster": {"storage": "runs"},  # relative: resolved against the submitting CWD
        "data": {
            "inputs": ["corpus"],
            "shards": {
                "tokenizer": {"train": {"vocab_size": 320}},
                "seq_len": 64,
                "heldout_fraction": 0.05,
            },
        },
    }
    (cwd / "d.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "CRUCIBLE_HOME": str(Path(local_cluster.state_dir).parent)}
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "data", "run", "d.yaml"],
        capture_output=True, text=True, cwd=cwd, timeout=900, env={**env, "COLUMNS": "100"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    try:
        yield {
            "cwd": cwd,
            "spec": spec,
            "docs": 120,
            "stdout": r.stdout,
            "run": cwd / "runs" / "mon-data",
        }
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with"]


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 470 training rows of 65 tokens (tokenizer of 320 ids) and a held-out split."""
    root = tmp_path_factory.mktemp("train-data")
    docs = root / "documents"
    docs.mkdir()
    rng = random.Random(0)
    ids = [f"doc{i}" for i in range(120)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 40, 200, 900]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate(
        {
            "seq_len": 64,
            "rows_per_shard": 200,
            "heldout_fraction": 0.05,
            "tokenizer": {"train": {"vocab_size": 320}},
        }
    )
    build_shards(docs, spec, root / "shards", LocalExecutor(), "train-tests")
    return root / "shards"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server for the session (moto in its own process, IAM auth); the
    environment points every S3 client of this process and of the processes it starts
    (Ray's included) at it, with the read-write identity, through the AWS SDKs' standard
    variables."""
    with s3_server() as server, pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server


CHECKPOINT_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.fixture
def fake_checkpoint(
    tmp_path: Path, train_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str, dict[str, Any]], tuple[Path, Any]]:
    """``make(name, model_section)``: a run directory with one committed checkpoint (step 3)
    of that model (random init, seed 4), and the model.

    The checkpoint is what a train run commits (manifest, sha256s, state, spec, the test
    shards and their tokenizer) in all but DeepSpeed's files: only ZeRO's consolidation
    (``get_fp32_state_dict_from_zero_checkpoint``) is replaced, returning the state dict of
    the model saved here (a real ZeRO-3 save needs a multi-rank run).
    """
    import json

    import torch

    from crucible.cluster.storage import location
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.model.gpt import build_model, init_weights

    def consolidated(checkpoint_dir: str, tag: str) -> dict[str, Any]:
        return torch.load(Path(checkpoint_dir) / tag / CHECKPOINT_MODEL_FILE)

    monkeypatch.setattr(
        "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint", consolidated
    )

    def make(name: str, model_section: dict[str, Any]) -> tuple[Path, Any]:
        spec = parse_spec(
            {
                "kind": "train",
                "name": name,
                "model": model_section,
                "data": {"shards": str(train_shards)},
                "train": {"num_workers": 1, "max_steps": 3},
            }
        )
        model = init_weights(build_model(spec.model.resolve()), seed=4).eval()  # type: ignore[union-attr]
        root = location(tmp_path / name / "checkpoints")
        ckpt.clear_for_save(root, 3)
        stage = ckpt.stage_dir(root, 3, "test")
        (stage / "ds").mkdir(parents=True)
        (stage / "crucible_state").mkdir()
        state = {"step": 3, "spec": spec.model_dump(mode="json")}
        (stage / ckpt.STATE).write_text(json.dumps(state))
        torch.save(model.state_dict(), stage / "ds" / CHECKPOINT_MODEL_FILE)
        (stage / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")
        (stage / "crucible_state" / "rank-0.pt").write_bytes(b"rng")
        ckpt.commit(root, 3, ckpt.hash_own_files(stage, 0, 1), 1)
        return tmp_path / name, model

    return make


@pytest.fixture
def tiny_checkpoint(
    fake_checkpoint: Callable[[str, dict[str, Any]], tuple[Path, Any]],
) -> tuple[Path, Any]:
    """A committed checkpoint of the tiny preset (init std 0.2: peaked logits, varied text)."""
    return fake_checkpoint("gen", {"preset": "tiny", "init_std": 0.2})


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: tiny-model tests are many times slower with every core on a busy
    machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """``cli(argv)``: ``crucible ARGV`` in this process; (exit code, stdout, stderr)."""
    from crucible.jobs.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            main(argv)
            rc = 0
        except SystemExit as e:
            rc = int(e.code or 0)
        out, err = capsys.readouterr()
        return rc, out, err

    return run
