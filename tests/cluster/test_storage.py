"""Run storage: a checkpoint directory round trip on a real local S3-compatible server
(moto in server mode) and on a local path, with manifest-last commits and sha256 checks."""

from __future__ import annotations

import json
import os
import socket

import pyarrow.fs as pafs
import pytest

from crucible.cluster.storage import (
    committed_steps,
    download_dir,
    latest_step,
    open_location,
    read_manifest,
    upload_dir,
    verify_dir,
)
from crucible.errors import CrucibleError


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 and a free port, with bucket ``runs``."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
    )
    fs.create_dir("runs")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _fake_checkpoint(d, step, world=2):
    """A checkpoint-shaped directory: per-rank shards, state and a nested folder."""
    d.mkdir(parents=True)
    (d / "ds").mkdir()
    for r in range(world):
        (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(
            os.urandom(100_000 + r)
        )
    (d / "crucible_state").mkdir()
    (d / "crucible_state" / "state.json").write_text(json.dumps({"step": step}))
    return d


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path):
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return open_location(f"s3://runs/{request.node.name}/checkpoints", endpoint)
    return open_location(tmp_path / "remote" / "checkpoints")


def test_round_trip_keeps_every_byte(root, tmp_path):
    src = _fake_checkpoint(tmp_path / "src", 100)
    manifest = upload_dir(src, root.child("step-100"), extra={"step": 100})
    assert manifest["step"] == 100 and len(manifest["files"]) == 3
    assert verify_dir(root.child("step-100"), deep=True) == []
    out = tmp_path / "restored"
    download_dir(root.child("step-100"), out)
    for p in src.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert committed_steps(root) == [100] and latest_step(root) == 100


def test_interrupted_upload_is_never_complete_nor_latest(root, tmp_path):
    upload_dir(_fake_checkpoint(tmp_path / "a", 100), root.child("step-100"))
    # An upload of step 200 dies after its shards and before its manifest.
    b = _fake_checkpoint(tmp_path / "b", 200)
    half = root.child("step-200")
    root.fs.create_dir(half.path, recursive=True)
    for p in sorted(b.rglob("*"))[:3]:
        if p.is_file():
            target = half.child(p.relative_to(b).as_posix())
            root.fs.create_dir(target.path.rsplit("/", 1)[0], recursive=True)
            with root.fs.open_output_stream(target.path) as o:
                o.write(p.read_bytes())
    assert read_manifest(half) is None
    assert "not committed" in verify_dir(half)[0]
    assert committed_steps(root) == [100] and latest_step(root) == 100
    with pytest.raises(CrucibleError, match="not a committed directory"):
        download_dir(half, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # Retrying the upload replaces the leftovers and commits it.
    upload_dir(b, half)
    assert latest_step(root) == 200 and verify_dir(half, deep=True) == []


def test_corruption_is_detected_and_nothing_is_left_behind(root, tmp_path):
    upload_dir(_fake_checkpoint(tmp_path / "a", 7), root.child("step-7"))
    victim = root.child("step-7").child("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with root.fs.open_input_stream(victim.path) as f:
        data = bytearray(f.read())
    data[10] ^= 0xFF  # same size, different content
    with root.fs.open_output_stream(victim.path) as o:
        o.write(bytes(data))
    assert verify_dir(root.child("step-7")) == []  # sizes alone cannot see it ...
    assert verify_dir(root.child("step-7"), deep=True) == [  # ... the sha256 can
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256"
    ]
    with pytest.raises(CrucibleError, match="does not match its sha256"):
        download_dir(root.child("step-7"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_committed_directory_is_immutable(root, tmp_path):
    src = _fake_checkpoint(tmp_path / "a", 1)
    upload_dir(src, root.child("step-1"))
    with pytest.raises(CrucibleError, match="already committed"):
        upload_dir(src, root.child("step-1"))


def test_bad_uris_are_clear_errors():
    with pytest.raises(CrucibleError, match="use a local/NFS path or s3://"):
        open_location("ftp://host/x")
    with pytest.raises(CrucibleError, match="has no bucket"):
        open_location("s3:///prefix")
    with pytest.raises(CrucibleError, match="is not a directory"):
        upload_dir(__import__("pathlib").Path("/nonexistent-dir"), "/tmp/x")
