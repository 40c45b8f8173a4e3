"""Exact ground truth for fuzzy dedup (benchmarks and tests; not part of the pipeline), and precision/recall/F1 of a dedup result against it.

The truth is the exact Jaccard similarity of the shingle sets MinHash estimates (word
``n``-grams of the simplified text, as :func:`~crucible.data_pipeline.dedup.minhash.
shingle_hashes` hashes them), computed for **every** pair of documents that shares at least
one shingle (every other pair has Jaccard 0): an inverted index from shingle to documents,
counted with numpy. True clusters are the connected components of the pairs at or above the
threshold, which is what the dedup's edges-then-components computes; a cluster of ``s``
documents should lose ``s - 1``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from crucible.data_pipeline.dedup.minhash import shingle_hashes

_PAIR_BLOCK = 1 << 22  # shingle-pair occurrences counted at once


def components_union_find(edges: dict[str, np.ndarray]) -> dict[int, int]:
    """Reference: ``{node: smallest node of its component}`` by union-find."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(edges["a"].tolist(), edges["b"].tolist(), strict=True):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return {x: find(x) for x in list(parent)}


def similar_pairs(
    texts: list[str], n_grams: int = 5, threshold: float = 0.8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, jaccard)`` (``i < j``) of every pair of ``texts`` with exact Jaccard of their
    word ``n_grams`` sets at or above ``threshold``.

    Args:
        texts: the documents.
        n_grams: words per shingle.
        threshold: minimum Jaccard (> 0: pairs sharing no shingle are never reported).
    """
    sets = [np.unique(shingle_hashes(t, n_grams)) for t in texts]
    sizes = np.array([s.size for s in sets], dtype=np.int64)
    h = np.concatenate(sets) if sets else np.zeros(0, np.uint64)
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), sizes)
    order = np.lexsort((doc, h))
    h, doc = h[order], doc[order]
    first = np.concatenate(([True], h[1:] != h[:-1])) if h.size else np.zeros(0, bool)
    start = np.maximum.accumulate(np.where(first, np.arange(h.size), 0))
    pos = np.arange(h.size) - start  # rank of the document within its shingle's group
    # every (earlier doc, later doc) pair within each shingle group, in blocks of rows
    cum = np.cumsum(pos)
    codes: list[np.ndarray] = []
    row, n = 0, len(texts)
    while row < h.size:
        done = int(cum[row - 1]) if row else 0
        end = min(max(int(np.searchsorted(cum, done + _PAIR_BLOCK, "right")), row + 1), h.size)
        p = pos[row:end]
        r = np.repeat(np.arange(row, end), p)
        k = np.arange(r.size) - np.repeat(np.cumsum(p) - p, p)
        codes.append(doc[start[r] + k] * n + doc[r])
        row = end
    pair, inter = np.unique(np.concatenate([np.zeros(0, np.int64), *codes]), return_counts=True)
    i, j = pair // max(n, 1), pair % max(n, 1)
    jac = inter / (sizes[i] + sizes[j] - inter)
    keep = jac >= threshold
    return i[keep], j[keep], jac[keep]


def true_clusters(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Clusters (of 2+ documents, members sorted) joined by the pairs ``(i, j)``.

    Args:
        n: number of documents.
        i: first document of each pair.
        j: second document of each pair.
    """
    roots = components_union_find({"a": np.asarray(i), "b": np.asarray(j)})
    groups: dict[int, list[int]] = {}
    for node, root in roots.items():
        if 0 <= node < n:
            groups.setdefault(root, []).append(node)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def dedup_scores(clusters: list[list[int]], removed: Iterable[int]) -> dict[str, float]:
    """Document-level precision, recall and F1 of the ``removed`` documents.

    A removal is correct up to ``s - 1`` per true cluster of size ``s``; removing a document
    that has no true near-duplicate, or the last member of a cluster, is a false positive.

    Args:
        clusters: true clusters (:func:`true_clusters`).
        removed: the documents the dedup dropped.
    """
    gone = set(removed)
    should = sum(len(c) - 1 for c in clusters)
    tp = sum(min(sum(m in gone for m in c), len(c) - 1) for c in clusters)
    p = tp / len(gone) if gone else 1.0
    r = tp / should if should else 1.0
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
        "removed": len(gone),
        "should_remove": should,
    }
