"""Benchmark data pipeline I against datatrove on a generated corpus with planted duplicates.

Reports documents/s and MB/s per core for the full chain (in-process executor, one core),
peak RSS, dedup precision/recall/F1 at Jaccard 0.8, and the same corpus through datatrove
(Gopher repetition + quality, C4, FineWeb filters, MinHash 14x8 on 5-grams) as a ratio.

    python bench/bench_data_pipeline.py --quick          # ~5 MB
    python bench/bench_data_pipeline.py --mb 200         # the real figure
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from crucible.data_pipeline.run import run_pipeline
from crucible.data_pipeline.sample import generate_corpus
from crucible.data_pipeline.spec import DataSpec

DATATROVE = r"""
import sys, time
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.filters import (GopherRepetitionFilter, GopherQualityFilter,
    C4QualityFilter, FineWebQualityFilter)
from datatrove.pipeline.dedup import (MinhashDedupSignature, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":
    inp, out = sys.argv[1], sys.argv[2]
    # sha1 shingle hashes: datatrove 0.10.1's xxhash path passes str, which xxhash 3.6 rejects
    cfg = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    t0 = time.time()
    LocalPipelineExecutor(pipeline=[JsonlReader(inp, glob_pattern="*.jsonl*"),
        GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
        MinhashDedupSignature(output_folder=f"{out}/sigs", config=cfg)],
        tasks=1, workers=1, logging_dir=f"{out}/l1").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{out}/sigs",
        output_folder=f"{out}/buckets", config=cfg)], tasks=14, workers=1,
        logging_dir=f"{out}/l2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{out}/buckets",
        output_folder=f"{out}/ids", config=cfg)], tasks=1, logging_dir=f"{out}/l3").run()
    LocalPipelineExecutor(pipeline=[JsonlReader(inp, glob_pattern="*.jsonl*"),
        GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
        MinhashDedupFilter(input_folder=f"{out}/ids"), JsonlWriter(f"{out}/docs")],
        tasks=1, workers=1, logging_dir=f"{out}/l4").run()
    print("SECONDS", time.time() - t0)
"""


def prf(truth: dict, run_dir: Path, threshold: float = 0.8) -> dict[str, float]:
    """Document-level precision/recall/F1 of the dedup drops.

    True clusters join planted pairs with exact 5-gram Jaccard >= ``threshold`` (and exact
    copies) among documents that reached dedup; a cluster of size s should lose s - 1.
    """
    exc = pq.read_table(sorted((run_dir / "exclusions").glob("*.parquet")), columns=["id", "rule"])
    rules = dict(zip(exc.column("id").to_pylist(), exc.column("rule").to_pylist(), strict=True))
    reached = {i for i in truth["texts"] if i not in rules or "dedup" in rules[i]}
    removed = {i for i, r in rules.items() if "dedup" in r}
    parent = {i: i for i in reached}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    pairs = [(d, s) for d, s, j in truth["near_dups"] if j >= threshold]
    pairs += [(d, s) for d, s in truth["exact_dups"]]
    for d, s in pairs:
        if d in reached and s in reached:
            parent[find(d)] = find(s)
    clusters: dict[str, list[str]] = {}
    for i in reached:
        clusters.setdefault(find(i), []).append(i)
    should = sum(len(c) - 1 for c in clusters.values())
    tp = sum(min(sum(m in removed for m in c), len(c) - 1) for c in clusters.values())
    p = tp / max(len(removed), 1)
    r = tp / max(should, 1)
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / max(p + r, 1e-9), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-datatrove", action="store_true")
    args = ap.parse_args()
    mb = 5.0 if args.quick else args.mb
    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    n_docs = int(mb * 1e6 / 1700)  # ~1.7 KB per generated document
    truth = generate_corpus(work / "in", n_docs=n_docs, seed=0, files=4, warc=False)
    size = sum(Path(f).stat().st_size for f in truth["files"])
    raw = sum(len(t.encode()) for t in truth["texts"].values())
    print(f"corpus: {n_docs} docs, {raw / 1e6:.1f} MB of text, {size / 1e6:.1f} MB on disk")

    results = {}
    for label, spec in (
        ("crucible full chain", DataSpec(inputs=[str(work / "in")])),
        (
            "crucible datatrove-equivalent",
            DataSpec(
                inputs=[str(work / "in")], language={"enabled": False}, pii={"enabled": False}
            ),
        ),
    ):
        run = work / label.replace(" ", "_")
        t0 = time.time()
        stats = run_pipeline(spec, run, executor="local", progress=False)
        dt = time.time() - t0
        results[label] = dt
        print(
            f"{label}: {dt:.1f} s, {n_docs / dt:,.0f} docs/s/core, {raw / 1e6 / dt:.2f} MB/s/core, "
            f"out {stats['totals']['docs_out']} docs, dedup {json.dumps(prf(truth, run))}"
        )
    print(
        f"peak RSS (this one-core worker): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if not args.no_datatrove:
        out = work / "dt"
        script = work / "dt.py"
        script.write_text(DATATROVE)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, str(script), str(work / "in"), str(out)],
            capture_output=True,
            text=True,
        )
        dt = time.time() - t0
        if proc.returncode:
            print("datatrove failed:", proc.stderr[-2000:])
        else:
            ours = results["crucible datatrove-equivalent"]
            print(
                f"datatrove: {dt:.1f} s, {n_docs / dt:,.0f} docs/s/core; crucible/datatrove speed ratio {dt / ours:.2f}x"
            )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
