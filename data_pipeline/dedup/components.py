"""Connected components by alternating large-star / small-star (Kiveris et al., SoCC 2014).

Each operation is a reduce over the edges grouped by one endpoint, so on Ray Data each is a
hash-partitioned shuffle by that endpoint: no task ever holds every edge. After O(log^2 n)
rounds every component is a star around its smallest key, which is the deterministic survivor.
The reduce functions are vectorised over any batch of complete groups, so the in-process
executor runs the very same code on the whole edge list at once, and the round loop
(:func:`connected_components`) is written once for every executor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crucible.data_pipeline.dedup.minhash import _mix
from crucible.data_pipeline.executors.base import Dataset, Executor

Edges = dict[str, np.ndarray]
EDGE_BYTES = 16  # an {a, b} int64 edge row


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.ones(a.size, dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[keep], b[keep]


def _group_min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For rows sorted by ``a``: min of ``b`` over each row's group."""
    first = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    mins = np.minimum.reduceat(b, first)
    return mins[np.searchsorted(first, np.arange(a.size), side="right") - 1]


def both_directions(batch: Edges) -> Edges:
    """Each undirected edge ``{a, b}`` as the two directed edges (a, b) and (b, a)."""
    a = np.asarray(batch["a"], dtype=np.int64)
    b = np.asarray(batch["b"], dtype=np.int64)
    return {"a": np.concatenate([a, b]), "b": np.concatenate([b, a])}


def large_star(batch: Edges) -> Edges:
    """Large-star over complete groups by ``a``: link each larger neighbour to the group min.

    Args:
        batch: directed edges ``{a, b}`` (both directions present), complete groups by ``a``.
    """
    a, b = _unique_pairs(np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64))
    if a.size == 0:
        return {"a": a, "b": b}
    m = np.minimum(_group_min(a, b), a)
    sel = b > a
    return dict(zip(("a", "b"), _unique_pairs(b[sel], m[sel]), strict=True))


def small_star(batch: Edges) -> Edges:
    """Small-star over complete groups by ``a`` (edges oriented ``a > b``): link the node and
    its smaller neighbours to the smallest of them.

    Args:
        batch: edges ``{a, b}`` with ``a > b``, complete groups by ``a``.
    """
    a, b = _unique_pairs(np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64))
    if a.size == 0:
        return {"a": a, "b": b}
    m = _group_min(a, b)
    first = np.concatenate(([True], a[1:] != a[:-1]))
    # (neighbour, min) for every neighbour other than the min, and (node, min) once per node
    sel = b != m
    out_a = np.concatenate([b[sel], a[first]])
    out_b = np.concatenate([m[sel], m[first]])
    return dict(zip(("a", "b"), _unique_pairs(out_a, out_b), strict=True))


def checksum(batch: Edges) -> dict[str, np.ndarray]:
    """``{n, h}``: edge count and a 64-bit order-free hash sum of the batch, for convergence."""
    a = np.asarray(batch["a"], dtype=np.int64).astype(np.uint64)
    b = np.asarray(batch["b"], dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(a * np.uint64(0x9E3779B97F4A7C15) + _mix(b)).sum(dtype=np.uint64)
    return {"n": np.array([a.size], np.int64), "h": np.array([h], np.uint64)}


def labels_from_stars(batch: Edges) -> dict[str, np.ndarray]:
    """Converged star edges ``{a: node, b: root}`` as ``{key, root}`` rows."""
    return {
        "key": np.asarray(batch["a"], dtype=np.int64),
        "root": np.asarray(batch["b"], dtype=np.int64),
    }


def connected_components(ex: Executor, edges: Dataset, max_rounds: int = 64) -> tuple[Any, int]:
    """``({key, root} rows, rounds)`` for every non-root node of the graph ``edges``.

    Each round is both directions, then large-star and small-star, each a shuffle by ``a``;
    it stops when a round leaves the edges' order-free checksum unchanged.

    Args:
        ex: the executor.
        edges: undirected edges ``{a, b}`` (int64), on ``ex``.
        max_rounds: give up (RuntimeError) after this many rounds; it converges in O(log^2 n).
    """
    cur, prev = edges, None
    for rnd in range(1, max_rounds + 1):
        # both directions double the edges; a round never outgrows its input's size
        nbytes = 2 * EDGE_BYTES * ex.count(cur)
        cur = ex.map_batches(cur, both_directions)
        cur = ex.shuffle(cur, ["a"], large_star, nbytes=nbytes)
        cur = ex.materialize(ex.shuffle(cur, ["a"], small_star, nbytes=nbytes))
        sums = ex.take_all(ex.map_batches(cur, checksum))
        key = (
            sum(int(r["n"]) for r in sums),
            int(np.array([r["h"] for r in sums], dtype=np.uint64).sum(dtype=np.uint64)),
        )
        if key == prev:
            return ex.map_batches(cur, labels_from_stars), rnd
        prev = key
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
