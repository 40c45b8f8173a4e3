"""Run storage: one code path for a local path and a real S3-compatible server (moto in
server mode, with IAM auth): whole-file atomic writes, manifest-last commits with sha256
checks, append-only logs, and one clear line for every storage a run cannot use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crucible.cluster.storage import (
    JsonlLog,
    check_storage,
    download_dir,
    location,
    read_jsonl,
    read_lines,
    read_manifest,
    upload_dir,
)
from crucible.errors import CrucibleError


def _fake_checkpoint(d: Path, step: int, world: int = 2) -> Path:
    """A checkpoint-shaped directory: per-rank shards, state and a nested folder."""
    (d / "ds").mkdir(parents=True)
    for r in range(world):
        (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(
            os.urandom(100_000 + r)
        )
    (d / "crucible_state").mkdir()
    (d / "crucible_state" / "state.json").write_text(json.dumps({"step": step}))
    return d


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path):
    """The same directory API on a bucket prefix and on a local path."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return location(f"{s3.bucket('runs')}/{request.node.name}")
    return location(tmp_path / "remote")


def verify_dir(where, deep: bool = False) -> list[str]:
    """Problems of a directory against its manifest (sizes; with ``deep``, every sha256)."""
    loc = location(where)
    manifest = read_manifest(loc)
    if manifest is None:
        return [f"{loc.uri} is not committed"]
    present = loc.walk()
    problems = []
    for rel, meta in manifest["files"].items():
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif present[rel] != meta["bytes"]:
            problems.append(f"{rel} has {present[rel]} bytes, the manifest says {meta['bytes']}")
        elif deep and (loc / rel).sha256() != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def committed(root) -> list[str]:
    """Names of the committed directories under ``root`` (their manifest is written)."""
    return [n for n in root.ls() if read_manifest(root / n) is not None]


def test_files_round_trip_and_list(root, tmp_path):
    (root / "a" / "b.json").write_json({"x": 1})
    (root / "a" / "c.txt").write_text("hello")
    assert (root / "a" / "b.json").read_json() == {"x": 1}
    assert root.ls() == ["a"] and (root / "a").ls() == ["b.json", "c.txt"]
    assert root.walk() == {"a/b.json": len((root / "a" / "b.json").read_bytes()), "a/c.txt": 5}
    assert [loc.name for loc in (root / "a").glob("*.txt")] == ["c.txt"]
    assert (root / "a").is_dir() and (root / "a" / "c.txt").is_file()
    assert not (root / "nope").exists() and (root / "nope").ls() == []
    with pytest.raises(FileNotFoundError):
        (root / "nope").read_bytes()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    got = (root / "big.bin").upload(src)
    assert got["bytes"] == 3 << 20 and (root / "big.bin").sha256() == got["sha256"]
    (root / "big.bin").download(tmp_path / "back.bin", got["sha256"], got["bytes"])
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    (root / "a").rmtree()
    assert not (root / "a").exists()


def test_a_failed_write_publishes_nothing(root):
    target = root / "part-00000.parquet"
    with pytest.raises(RuntimeError), target.writing() as pending:
        pending.path.write_bytes(b"half a file")
        raise RuntimeError("writer died")
    assert not target.exists() and root.ls() == []
    with target.writing() as pending:
        pending.path.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and root.ls() == ["part-00000.parquet"]


def test_a_killed_writer_leaves_no_object(root, tmp_path):
    """A process SIGKILLed while streaming a file to its location: nothing appears there."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from crucible.cluster.storage import location
        p = location({root.uri!r}) / "f.bin"
        with p.writing() as pending:
            pending.path.write_bytes(os.urandom(1 << 20))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], check=False)
    assert r.returncode == -9
    assert not (root / "f.bin").exists()


def test_jsonl_log_appends_reopens_and_rolls_segments(root):
    log = JsonlLog(root / "m.jsonl", sync_every_s=0, segment_bytes=200)
    for i in range(50):
        log.append({"i": i})
    log.close()
    log = JsonlLog(root / "m.jsonl", segment_bytes=200)  # a later writer carries on
    log.append({"i": 50}, sync=True)
    log.close()
    assert [r["i"] for r in read_jsonl(root / "m.jsonl")] == list(range(51))
    if not root.renames:  # object stores: no append, segments of at most 200 bytes
        assert len([n for n in root.ls() if n.startswith("m.jsonl")]) > 1
    assert read_jsonl(root / "absent.jsonl") == []


def test_jsonl_log_syncs_only_when_due(root):
    log = JsonlLog(root / "m.jsonl", sync_every_s=3600)
    log.append({"i": 0}, sync=True)
    log.append({"i": 1})  # not yet durable on an object store ...
    if not root.renames:
        assert [r["i"] for r in read_jsonl(root / "m.jsonl")] == [0]
    log.flush()  # ... until the next sync
    assert [r["i"] for r in read_jsonl(root / "m.jsonl")] == [0, 1]
    log.close()


def test_torn_last_line_is_skipped(root):
    (root / "m.jsonl").write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": ')
    assert read_jsonl(root / "m.jsonl") == [{"i": 0}, {"i": 1}]
    assert read_lines(root / "m.jsonl")[-1] == '{"i": '


def test_round_trip_keeps_every_byte(root, tmp_path):
    src = _fake_checkpoint(tmp_path / "src", 100)
    manifest = upload_dir(src, root / "step-100", extra={"step": 100})
    assert manifest["step"] == 100 and len(manifest["files"]) == 3
    assert verify_dir(root / "step-100", deep=True) == []
    out = tmp_path / "restored"
    download_dir(root / "step-100", out)
    for p in src.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert committed(root) == ["step-100"]


def test_interrupted_upload_is_never_complete_nor_latest(root, tmp_path):
    upload_dir(_fake_checkpoint(tmp_path / "a", 100), root / "step-100")
    # An upload of step 200 dies after its shards and before its manifest.
    b = _fake_checkpoint(tmp_path / "b", 200)
    half = root / "step-200"
    for p in sorted(b.rglob("*"))[:3]:
        if p.is_file():
            (half / p.relative_to(b).as_posix()).upload(p)
    assert read_manifest(half) is None
    assert "not committed" in verify_dir(half)[0]
    assert committed(root) == ["step-100"]
    with pytest.raises(CrucibleError, match="not a committed directory"):
        download_dir(half, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # Retrying the upload replaces the leftovers and commits it.
    upload_dir(b, half)
    assert committed(root) == ["step-100", "step-200"] and verify_dir(half, deep=True) == []


def test_corruption_is_detected_and_nothing_is_left_behind(root, tmp_path):
    upload_dir(_fake_checkpoint(tmp_path / "a", 7), root / "step-7")
    victim = root / "step-7" / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    assert verify_dir(root / "step-7") == []  # sizes alone cannot see it ...
    assert verify_dir(root / "step-7", deep=True) == [  # ... the sha256 can
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256"
    ]
    with pytest.raises(CrucibleError, match="does not match its sha256"):
        download_dir(root / "step-7", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    victim.rm()
    with pytest.raises(CrucibleError, match="is missing"):
        download_dir(root / "step-7", tmp_path / "out")


def test_committed_directory_is_immutable(root, tmp_path):
    src = _fake_checkpoint(tmp_path / "a", 1)
    upload_dir(src, root / "step-1")
    with pytest.raises(CrucibleError, match="already committed"):
        upload_dir(src, root / "step-1")


def test_a_location_travels_by_uri(root):
    """Pickled into a Ray task, a location is rebuilt from its URI on the receiving side
    (which takes that node's credentials, never the sender's)."""
    import pickle

    back = pickle.loads(pickle.dumps(root / "x"))
    assert back.uri == (root / "x").uri and back.fs.type_name == root.fs.type_name


def test_bad_uris_are_clear_errors():
    with pytest.raises(CrucibleError, match="scheme ftp:// is not supported"):
        location("ftp://host/x")
    with pytest.raises(CrucibleError, match="has no bucket"):
        location("s3:///prefix")
    with pytest.raises(CrucibleError, match="is not a directory"):
        upload_dir(Path("/nonexistent-dir"), "/tmp/x")


def test_spec_storage_is_checked_when_parsed():
    from crucible.jobs.spec import parse_spec

    base = {"kind": "data", "name": "r", "data": {"inputs": ["x.jsonl"]}}
    with pytest.raises(CrucibleError, match="cluster.storage.*no bucket"):
        parse_spec(base | {"cluster": {"storage": "s3://"}})
    with pytest.raises(CrucibleError, match="cluster.storage.*not supported"):
        parse_spec(base | {"cluster": {"storage": "ftp://h/x"}})
    ok = parse_spec(base | {"cluster": {"storage": "s3://bucket/runs"}})
    assert ok.cluster.storage == "s3://bucket/runs"


def test_unusable_storage_is_one_clear_line_before_any_work(s3, monkeypatch, tmp_path):
    runs = s3.bucket("usable") + "/runs"
    assert check_storage(runs).uri == "s3://usable/runs"
    with pytest.raises(CrucibleError, match=r"bucket 'absent' does not exist"):
        check_storage("s3://absent/runs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.ro[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.ro[1])
    check_storage(runs, write=False)  # reading is allowed ...
    with pytest.raises(CrucibleError, match=r"s3://usable/runs: access denied.*credentials"):
        check_storage(runs)  # ... writing is not
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(CrucibleError, match=r"s3://usable/runs: access denied"):
        check_storage(runs, write=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(CrucibleError, match=r"cannot reach the S3 endpoint http://127.0.0.1:9"):
        check_storage(runs)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(CrucibleError, match="is a file"):
        check_storage(f)


def test_the_cli_refuses_unusable_storage_in_one_line_before_any_work(s3, tmp_path):
    """``crucible data run`` with a missing bucket: exit 2, one ``error:`` line naming the
    URI, no traceback, nothing written anywhere."""
    (tmp_path / "in.jsonl").write_text('{"text": "hello world"}\n')
    spec = tmp_path / "d.yaml"
    spec.write_text(
        "kind: data\nname: nowhere\ncluster:\n  storage: s3://absent-bucket/runs\n"
        f"data:\n  inputs: [{tmp_path / 'in.jsonl'}]\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "data", "run", str(spec), "--local"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: storage s3://absent-bucket/runs")
    assert "does not exist" in lines[0] and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "spec", "check", str(spec),
         "--set", "cluster.storage=s3:///runs"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "has no bucket" in r.stderr and "Traceback" not in r.stderr
