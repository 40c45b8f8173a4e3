"""Where a data run keeps its files: the outputs, the working directories and the markers.

Every stage publishes each output file whole and writes a JSON marker last, so a rerun skips
finished work and redoes unfinished work from scratch. Nothing relies on renaming a
directory, so the same layout works on object stores.
"""

from __future__ import annotations

from typing import Any

from crucible.cluster.storage import Location
from crucible.errors import CrucibleError


def part_name(part: int) -> str:
    """File name of part ``part``."""
    return f"part-{part:05d}.parquet"


def marker_name(part: int) -> str:
    """Marker file name of part ``part``."""
    return f"part-{part:05d}.json"


def work_paths(run_dir: Location) -> dict[str, Location]:
    """The run's working and output directories."""
    work = run_dir / "_work"
    return {
        "work": work,
        "filtered": work / "filtered",
        "excluded": work / "excluded",
        "filter_done": work / "filter_done",
        "dedup": work / "dedup",
        "final_done": work / "final_done",
        "documents": run_dir / "documents",
        "exclusions": run_dir / "exclusions",
    }


def read_marker(loc: Location) -> dict[str, Any] | None:
    """A stage marker's stats, or None when the stage has not finished."""
    try:
        data = loc.read_json()
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_run_dir(run_dir: Location, digest: str, inputs: list[str]) -> None:
    """Claim ``run_dir`` for this spec and input list, or refuse one that holds another run.

    Args:
        run_dir: the run directory.
        digest: the spec's hash.
        inputs: the expanded input files.

    Raises:
        CrucibleError: ``run_dir`` holds a run of another spec or input list.
    """
    meta_path = work_paths(run_dir)["work"] / "run.json"
    meta = read_marker(meta_path)
    if meta is None:
        meta_path.write_json({"spec_hash": digest, "inputs": inputs})
    elif meta.get("spec_hash") != digest or meta.get("inputs") != inputs:
        raise CrucibleError(
            f"{run_dir} holds a data run of a different spec or input list; "
            "use a new run directory (or delete this one) to run this spec"
        )
