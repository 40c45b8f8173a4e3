"""Fuzzy dedup, once for every executor: LSH buckets -> verified edges -> connected components.

The shuffles, in order (each a hash partition of the rows by the named key, so no task ever
holds every signature, text or edge):

1. ``bucket``: one row per (document, band) carrying the document's compact signature;
   candidate pairs in a bucket are checked against the MinHash estimate (:mod:`.lsh`);
2. ``key`` then ``(a, b)``: pairs too close to the threshold get their exact Jaccard, the two
   texts brought to the pair (:mod:`.verify`);
3. ``a``, twice per round: large-star / small-star until stable (:mod:`.components`);
4. ``root`` then ``members``: the cluster-size histogram.
The result is a ``{key, root}`` row for every document that is not its cluster's survivor.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from crucible.cluster.storage import Location
from crucible.data_pipeline.batches import column_bytes, num_rows
from crucible.data_pipeline.dedup.components import connected_components
from crucible.data_pipeline.dedup.lsh import bucket_edges, explode_bands
from crucible.data_pipeline.dedup.verify import (
    attach_text,
    doc_rows,
    exact_edges,
    pair_ends,
    unique_pairs,
)
from crucible.data_pipeline.executors.base import Dataset, Executor
from crucible.data_pipeline.spec import MinHashSpec

LABEL_BYTES = 16  # a {key, root} int64 row


def band_row_bytes(mh: MinHashSpec) -> int:
    """Bytes of one exploded band row: bucket, key and the document's uint32 signature."""
    return 8 + 8 + 4 * mh.num_perm


def select_edges(batch: dict[str, np.ndarray], col: str, value: bool = True) -> dict:
    """The ``{a, b}`` edges of a batch whose flag ``col`` equals ``value``."""
    keep = np.asarray(batch[col], bool) == value
    return {"a": np.asarray(batch["a"])[keep], "b": np.asarray(batch["b"])[keep]}


def root_sizes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{root, members}``: non-root members per root, from complete groups by ``root``."""
    roots, members = np.unique(np.asarray(batch["root"], np.int64), return_counts=True)
    return {"root": roots, "members": members.astype(np.int64)}


def size_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{members, clusters}``: clusters per member count, from complete groups."""
    sizes, clusters = np.unique(np.asarray(batch["members"], np.int64), return_counts=True)
    return {"members": sizes, "clusters": clusters.astype(np.int64)}


def band_rows(ex: Executor, files: Sequence[Location], mh: MinHashSpec) -> Dataset:
    """One ``{bucket, key, signature}`` row per (document, band) of the filtered ``files``."""
    docs = ex.read_parquet(files, ["key", "bands", "signature"])
    return ex.map_batches(docs, explode_bands, out_row_bytes=mh.num_bands * band_row_bytes(mh))


def exact_check(
    ex: Executor, files: Sequence[Location], pairs: Dataset, n_grams: int, threshold: float
) -> Dataset:
    """``{a, b, kept}`` of each distinct pair: texts joined to pair ends by key, then the two
    ends of each pair brought together by pair."""
    docs = ex.map_batches(ex.read_parquet(files, ["key", "text"]), doc_rows)
    rows = ex.union(ex.map_batches(pairs, pair_ends), docs)
    # texts dominate both shuffles (each pair end carries one text after attach_text)
    nbytes = column_bytes(files, ["key", "text"])
    with_text = ex.shuffle(rows, ["key"], attach_text, nbytes=nbytes)
    check = functools.partial(exact_edges, n_grams=n_grams, threshold=threshold)
    return ex.shuffle(with_text, ["a", "b"], check, nbytes=nbytes)


def cluster_histogram(ex: Executor, labels: Dataset, n_labels: int) -> dict[str, int]:
    """``{cluster size: number of clusters}`` of the ``{key, root}`` rows (only the
    histogram reaches the driver)."""
    sizes = ex.shuffle(labels, ["root"], root_sizes, nbytes=LABEL_BYTES * n_labels)
    hist: Counter[str] = Counter()
    for r in ex.take_all(ex.shuffle(sizes, ["members"], size_counts)):
        hist[str(int(r["members"]) + 1)] += int(r["clusters"])
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0])))


def fuzzy_dedup(
    ex: Executor, files: Sequence[Location], out_dir: Location, mh: MinHashSpec
) -> dict[str, Any]:
    """Near-duplicates among the filtered ``files``: ``{key, root}`` of every non-survivor
    written by part into ``out_dir``; the counts of each shuffle's result.

    Args:
        ex: the executor.
        files: the filtered parts (``key``, ``bands``, ``signature``, ``text`` columns).
        out_dir: the new result directory.
        mh: the MinHash spec.
    """
    rows = band_rows(ex, files, mh)
    nbytes = num_rows(files) * mh.num_bands * band_row_bytes(mh)
    check = functools.partial(bucket_edges, threshold=mh.threshold, margin=mh.margin)
    checked = ex.materialize(ex.shuffle(rows, ["bucket"], check, nbytes=nbytes))
    edges = ex.map_batches(checked, functools.partial(select_edges, col="sure"))
    unsure = ex.map_batches(checked, functools.partial(select_edges, col="sure", value=False))
    unsure = ex.materialize(ex.map_batches(unsure, unique_pairs))
    n_unsure, n_exact = ex.count(unsure), 0
    if n_unsure:
        exact = ex.materialize(exact_check(ex, files, unsure, mh.n_grams, mh.threshold))
        n_unsure = ex.count(exact)  # distinct pairs (unsure repeats them across buckets)
        kept = ex.materialize(ex.map_batches(exact, functools.partial(select_edges, col="kept")))
        n_exact = ex.count(kept)
        edges = ex.union(edges, kept)
    edges = ex.materialize(edges)
    n_edges = ex.count(edges)
    rounds, n_dups, hist = 0, 0, {}
    if n_edges:
        labels, rounds = connected_components(ex, edges, mh.max_rounds)
        labels = ex.materialize(labels)
        n_dups = ex.count(labels)
        hist = cluster_histogram(ex, labels, n_dups)
        ex.write_by_part(labels, out_dir)
    else:
        out_dir.mkdirs()
    return {
        "edges": n_edges,
        "exact_checked": n_unsure,
        "exact_kept": n_exact,
        "rounds": rounds,
        "duplicates": n_dups,
        "cluster_sizes": hist,
    }
