"""``crucible data stats RUN``: the run's stats.json (and its shard set's manifest, when it
has one) as a readable report."""

from __future__ import annotations

import json
from typing import Any

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError

FILE_FAILURES = ("empty", "corrupt", "truncated")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _files_line(read: dict[str, Any]) -> str:
    """Input files read, and the whole-file failures the reader counts apart from documents."""
    c = read.get("counters", {})
    failed = [f"{c[f'files/{k}']:,} {k}" for k in FILE_FAILURES if c.get(f"files/{k}")]
    line = f"  input files: {c.get('files', 0):,} read"
    line += "; failed as a whole: " + ", ".join(failed) if failed else "; none failed"
    if c.get("format_mismatch"):
        line += f"; {c['format_mismatch']:,} read by content (name says another format)"
    return line


def _normalize_line(norm: dict[str, Any]) -> str | None:
    c = norm.get("counters", {})
    if not c.get("chars_removed") and not c.get("control_chars"):
        return None
    return (
        f"  normalize removed {c.get('chars_removed', 0):,} characters: "
        f"{c.get('control_chars', 0):,} control or invisible ({c.get('nul_chars', 0):,} NUL)"
    )


def format_shards(shards_dir: Location) -> list[str]:
    """Lines on the shard set in ``shards_dir`` (none when it has no manifest)."""
    from crucible.data_pipeline.shards.manifest import MANIFEST, read_manifest

    if not (shards_dir / MANIFEST).is_file():
        return []
    m = read_manifest(shards_dir)
    lines = [f"  shards in {shards_dir.uri}:"]
    for name, split in m.splits.items():
        if split.rows:
            lines.append(
                f"    {name:<8}{split.rows:>12,} rows{split.tokens:>16,} tokens"
                f"{len(split.shards):>6} files"
            )
    t = m.totals
    lines.append(
        f"    from {t.documents:,} documents, {t.document_tokens:,} tokens "
        f"(seq_len {m.seq_len}, {_mb(t.bytes)} of shards)"
    )
    return lines


def format_stats(run_dir: str | Location) -> str:
    """A readable summary of ``run_dir/stats.json``: input files (whole-file failures apart
    from document drops), per-step flow, drops, languages, clusters, and the shards when built.

    Args:
        run_dir: a data run directory.

    Raises:
        CrucibleError: the run has no stats.json (not run, or not finished).
    """
    run = location(run_dir)
    path = run / "stats.json"
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
        _files_line(stats["steps"].get("read", {})),
    ]
    norm = _normalize_line(stats["steps"].get("normalize", {}))
    lines += [norm] if norm else []
    lines += [
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
    shards = format_shards(run / "shards")
    if shards:
        lines += ["", *shards]
    return "\n".join(lines)
