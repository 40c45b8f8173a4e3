"""Hash every output of a data run, to show two versions of crucible write the same bytes.

Generates the sample corpus (with planted exact and near duplicates), runs the data pipeline
in this process with MinHash dedup and a shard build, then prints one sha256 per output file
(clean documents, exclusions, stats.json and _SUCCESS without their timing fields, tokenizer,
shards, HF metadata, manifest) and one over them all. Which crucible runs is whichever
``import crucible`` finds, so the version under test is chosen with PYTHONPATH:

    .venv/bin/python bench/compare_data_outputs.py --out /tmp/new.txt
    PYTHONPATH=/tmp/basepkg .venv/bin/python bench/compare_data_outputs.py --out /tmp/old.txt
    diff /tmp/old.txt /tmp/new.txt                      # identical: same outputs
    ... --executor ray                                  # the same on a local Ray
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

# fields that record when or how long, not what: left out of the hashes
TIMING_FIELDS = {"seconds", "executor", "created", "created_at", "timestamp", "elapsed_s"}


def _strip(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def file_hash(path: Path) -> str:
    """sha256 of a file; JSON files without their timing fields."""
    data = path.read_bytes()
    if path.suffix == ".json" or path.name == "_SUCCESS":
        with contextlib.suppress(ValueError):
            data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def hash_outputs(run: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every output file of the run (not its ``_work``)."""
    out = {}
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run).as_posix()
        if f.is_file() and not rel.startswith("_work/") and "/_work/" not in rel:
            out[rel] = file_hash(f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--docs", type=int, default=800)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, help="also write the hashes here")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "crucible-compare-data",
        help="emptied and reused: input paths are in the outputs (source, spec hash), so "
        "both versions must read the corpus from the same place",
    )
    args = ap.parse_args()

    import crucible
    from crucible.data_pipeline.sample import generate_corpus
    from crucible.data_pipeline.spec import DataSpec

    try:
        from crucible.data_pipeline.pipeline import run_pipeline
    except ImportError:  # the code before the pipeline contract
        from crucible.data_pipeline.run import run_pipeline  # type: ignore[no-redef]

    if args.executor == "ray":
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = args.workdir
    shutil.rmtree(root, ignore_errors=True)
    try:
        generate_corpus(root / "in", n_docs=args.docs, seed=args.seed)
        spec = DataSpec.model_validate(
            {
                "inputs": [str(root / "in")],
                "reader": {"batch_size": 50},
                "dedup": {"minhash": {"enabled": True}},
                "shards": {
                    "seq_len": 32,
                    "rows_per_shard": 300,
                    "heldout_fraction": 0.05,
                    "tokenizer": {"train": {"vocab_size": 400}},
                },
            }
        )
        stats = run_pipeline(spec, root / "run", executor=args.executor, progress=False)
        hashes = hash_outputs(root / "run")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    lines = [f"{v}  {k}" for k, v in hashes.items()] + [f"{total}  (all {len(hashes)} files)"]
    print(f"crucible from {Path(crucible.__file__).parent}", file=sys.stderr)
    print(
        f"{stats['totals']['docs_in']} docs in, {stats['totals']['docs_out']} out, "
        f"minhash {json.dumps(stats['dedup'].get('minhash'))}",
        file=sys.stderr,
    )
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
