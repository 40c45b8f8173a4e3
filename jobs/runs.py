"""Run directories: ``<storage>/<name>/`` holds the resolved spec and everything a run writes.

A run has a stable name. Submitting a spec under a name whose directory already holds a
different spec is refused (instead of silently continuing an old run); the same spec again
resumes it, which for a data job finishes what is missing or does nothing.
"""

from __future__ import annotations

import glob
from pathlib import Path

import yaml

from crucible.config import spec_hash
from crucible.errors import CrucibleError
from crucible.jobs.spec import RunSpec, TrainRunSpec, load_spec, parse_spec, write_resolved

RESOLVED = "spec.resolved.yaml"


def absolutize(spec: RunSpec, base: Path | None = None) -> RunSpec:
    """Make the spec's local paths absolute (relative to ``base``, default the CWD).

    The job runs in another working directory (and on a cluster, on another machine with the
    same shared paths), so the resolved spec must not depend on where it was submitted from.
    """
    base = (base or Path.cwd()).resolve()
    data = spec.model_dump(mode="json")

    def fix(p: str) -> str:
        if "://" in p or Path(p).is_absolute():
            return p
        return str(base / p)

    data["cluster"]["storage"] = fix(data["cluster"]["storage"])
    if spec.kind == "train":
        data["data"]["shards"] = fix(data["data"]["shards"])
    else:
        data["data"]["inputs"] = [fix(p) for p in data["data"]["inputs"]]
        shards = data["data"].get("shards") or {}
        tok = shards.get("tokenizer") or {}
        if tok.get("path"):
            tok["path"] = fix(tok["path"])
    return parse_spec(data, source="spec")


def run_dir(spec: RunSpec) -> Path:
    """``<storage>/<name>``."""
    return Path(spec.cluster.storage) / spec.name


def prepare_run(spec: RunSpec, resume: bool = False) -> Path:
    """Create (or reopen) the run directory of ``spec`` and write the resolved spec into it.

    Raises:
        CrucibleError: the name is taken by a run of a different spec, or the storage path
            is not writable.
    """
    d = run_dir(spec)
    existing = d / RESOLVED
    if existing.exists():
        old = load_spec(existing)
        if spec_hash(old) != spec_hash(spec) and not resume:
            raise CrucibleError(
                f"run {spec.name!r} already exists in {d} with a different spec; "
                "pick another name, or `crucible resume` it as it was"
            )
    try:
        write_resolved(spec, d)
    except OSError as e:
        raise CrucibleError(
            f"cannot write the run directory {d}: {e.strerror}; set cluster.storage to a "
            "writable path"
        ) from None
    return d


def find_run(run: str, storage: str | None = None) -> Path:
    """A run directory from a path or a run name (looked up under ``storage``, default 'runs')."""
    p = Path(run)
    if (p / RESOLVED).exists():
        return p.resolve()
    candidate = Path(storage or "runs") / run
    if (candidate / RESOLVED).exists():
        return candidate.resolve()
    matches = glob.glob(str(Path(storage or "runs") / "*" / RESOLVED))
    names = ", ".join(sorted(Path(m).parent.name for m in matches)[:10]) or "none"
    raise CrucibleError(
        f"no run {run!r} (looked for {p / RESOLVED} and {candidate / RESOLVED}); "
        f"runs under {storage or 'runs'}: {names}"
    )


def load_train_spec(d: Path) -> TrainRunSpec:
    """The resolved spec of train run ``d`` (an error if the run is not a train run)."""
    spec = load_run_spec(d)
    if not isinstance(spec, TrainRunSpec):
        raise CrucibleError(f"{d} is a {spec.kind} run, not a train run")
    return spec


def load_run_spec(d: Path) -> RunSpec:
    """The resolved spec saved in run directory ``d``."""
    text = (d / RESOLVED).read_text()
    return parse_spec(yaml.safe_load(text), source=str(d / RESOLVED))
