"""``crucible data stats RUN``: the run's stats.json as a readable report."""

from __future__ import annotations

import json

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_stats(run_dir: str | Location) -> str:
    """A readable summary of ``run_dir/stats.json``: per-step flow, drops, languages, clusters.

    Args:
        run_dir: a data run directory.

    Raises:
        CrucibleError: the run has no stats.json (not run, or not finished).
    """
    path = location(run_dir) / "stats.json"
    try:
        stats = path.read_json()
    except FileNotFoundError:
        raise CrucibleError(
            f"{path} does not exist; the data run has not finished (run `crucible data run`)"
        ) from None
    except json.JSONDecodeError:
        raise CrucibleError(f"{path} is not valid JSON; rerun the data job to rewrite it") from None
    t = stats["totals"]
    lines = [
        f"data run {run_dir}: {stats['inputs']} input files, {stats.get('seconds', 0):.1f} s "
        f"({stats.get('executor', '?')} executor)",
        f"  documents {t['docs_in']:,} -> {t['docs_out']:,}   "
        f"input {_mb(t['bytes_in'])} on disk -> {_mb(t['bytes_out'])} of clean text",
        "",
        f"  {'step':<18}{'docs in':>12}{'docs out':>12}{'kept':>8}{'bytes out':>14}",
    ]
    from crucible.data_pipeline.pipeline import STEP_ORDER

    steps = stats["steps"]
    for name in sorted(steps, key=lambda k: STEP_ORDER.index(k) if k in STEP_ORDER else 99):
        s = steps[name]
        kept = s["docs_out"] / s["docs_in"] if s["docs_in"] else 1.0
        lines.append(
            f"  {name:<18}{s['docs_in']:>12,}{s['docs_out']:>12,}{kept:>8.1%}"
            f"{_mb(s['bytes_out']):>14}"
        )
    if stats["drops"]:
        lines += ["", "  drops by rule:"]
        for rule, n in sorted(stats["drops"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {rule:<44}{n:>10,}")
    if stats["languages"]:
        top = sorted(stats["languages"].items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        lines += ["", "  languages: " + ", ".join(f"{k} {v:,}" for k, v in top)]
    if stats["duplicate_clusters"]:
        hist = sorted(stats["duplicate_clusters"].items(), key=lambda kv: int(kv[0]))
        lines += ["  duplicate clusters (size: count): " + ", ".join(f"{k}: {v}" for k, v in hist)]
    return "\n".join(lines)
