"""Rules of the source tree that keep local and remote runs on one code path.

- No ``pathlib`` or ``os.path`` arithmetic on anything that can be a URI: run directories,
  storage roots, shard sets, checkpoints and data inputs go through
  ``crucible.cluster.storage`` (``Path("s3://b/x")`` silently becomes ``s3:/b/x``).
- Ray is started only by the data executors and the train job's driver, never by a step.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = [
    p
    for p in ROOT.rglob("*.py")
    if not {"tests", "bench", ".venv", "build", ".lint", "examples"}
    & set(p.relative_to(ROOT).parts)
]
# Names that hold a path-or-URI somewhere in crucible.
URI_NAMES = r"storage|shards|shards_dir|run_dir|run|uri|inputs|checkpoint|documents_dir|out_dir"
LOCAL_ONLY = re.compile(
    rf"\b(?:Path|PurePath|os\.path\.\w+|open|glob\.glob)\(\s*(?:spec\.\w+\.)?(?:{URI_NAMES})\b"
)


def test_the_package_is_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PACKAGE}
    assert {"cluster/storage/location.py", "jobs/runs.py", "data_pipeline/shards/build.py"} <= names


def test_no_path_arithmetic_on_uris() -> None:
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in PACKAGE
        if "storage" not in p.relative_to(ROOT).parts[:2]  # the storage layer itself
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if LOCAL_ONLY.search(line)
    ]
    assert offenders == []


def test_the_grep_finds_what_it_forbids() -> None:
    for line in (
        "d = Path(run_dir) / 'x'",
        "Path(spec.cluster.storage) / name",
        "os.path.join(shards, 'manifest.json')",
        "with open(checkpoint) as f:",
    ):
        assert LOCAL_ONLY.search(line), line
    assert not LOCAL_ONLY.search("d = location(run_dir) / 'x'")


def test_only_executors_and_entry_points_start_ray() -> None:
    allowed = {
        "data_pipeline/executors/ray.py",
        "jobs/train/run.py",
        "jobs/rlhf/rejection.py",
        "jobs/rlhf/ppo.py",
    }
    starts = {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE
        if re.search(r"\bray\.init\(", p.read_text())
    }
    assert starts <= allowed, starts - allowed
    steps = [p for p in PACKAGE if "data_pipeline" in p.parts and "executors" not in p.parts]
    importing = [
        p.relative_to(ROOT).as_posix()
        for p in steps
        if re.search(r"^\s*(import ray|from ray)\b", p.read_text(), re.M)
    ]
    assert importing == []
