"""Exact check of the candidate pairs whose MinHash estimate is too close to the threshold.

With 112 permutations the estimate of a Jaccard-0.8 pair has a standard error of 0.038, so
pairs between about 0.7 and 0.9 land on either side of the threshold by chance. Those pairs
(a small share of all candidates) get the exact Jaccard of their shingle sets, computed from
the two texts with the same shingling MinHash uses.

On Ray the texts are brought to the pairs by two hash-partitioned groupbys, never by a task
that holds every text: pair ends and documents grouped by key (:func:`attach_text`), then the
two ends of each pair grouped by pair (:func:`exact_edges`).
"""

from __future__ import annotations

import numpy as np

from crucible.data_pipeline.dedup.minhash import shingle_hashes


def exact_jaccard(text_a: str, text_b: str, n_grams: int) -> float:
    """Exact Jaccard of the word ``n_grams`` shingle sets of two texts.

    Args:
        text_a: one text.
        text_b: the other.
        n_grams: words per shingle.
    """
    sa = np.unique(shingle_hashes(text_a, n_grams))
    sb = np.unique(shingle_hashes(text_b, n_grams))
    union = sa.size + sb.size
    if union == 0:
        return 1.0
    inter = np.intersect1d(sa, sb, assume_unique=True).size
    return inter / (union - inter)


def unique_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Distinct ``{a, b}`` pairs of a batch of edges.

    Args:
        batch: ``a`` and ``b`` columns (int64).
    """
    a = np.asarray(batch["a"], np.int64)
    b = np.asarray(batch["b"], np.int64)
    if a.size == 0:
        return {"a": a, "b": b}
    pair = np.unique(np.stack([a, b], axis=1), axis=0)
    return {"a": pair[:, 0].copy(), "b": pair[:, 1].copy()}


def pair_ends(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each pair ``{a, b}`` as two rows ``{key, a, b, text}``, one per end (text empty).

    Args:
        batch: ``a`` and ``b`` columns.
    """
    a = np.asarray(batch["a"], np.int64)
    b = np.asarray(batch["b"], np.int64)
    n = 2 * a.size
    return {
        "key": np.concatenate([a, b]),
        "a": np.concatenate([a, a]),
        "b": np.concatenate([b, b]),
        "text": np.full(n, "", dtype=object),
    }


def doc_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Documents ``{key, text}`` as rows of the same shape as :func:`pair_ends` (a = b = -1).

    Args:
        batch: ``key`` and ``text`` columns.
    """
    keys = np.asarray(batch["key"], np.int64)
    none = np.full(keys.size, -1, dtype=np.int64)
    return {"key": keys, "a": none, "b": none.copy(), "text": np.asarray(batch["text"], object)}


def attach_text(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pair ends with their document's text, from rows holding complete key groups.

    Args:
        batch: :func:`pair_ends` and :func:`doc_rows` rows, complete groups by ``key``.
    """
    keys = np.asarray(batch["key"], np.int64)
    a = np.asarray(batch["a"], np.int64)
    is_doc = a < 0
    docs = dict(zip(keys[is_doc].tolist(), np.asarray(batch["text"], object)[is_doc], strict=True))
    ends = np.flatnonzero(~is_doc)
    ends = ends[np.isin(keys[ends], keys[is_doc])]
    return {
        "key": keys[ends],
        "a": a[ends],
        "b": np.asarray(batch["b"], np.int64)[ends],
        "text": np.array([docs[k] for k in keys[ends].tolist()], dtype=object),
    }


def exact_edges(batch: dict[str, np.ndarray], n_grams: int, threshold: float) -> dict:
    """Each distinct pair ``{a, b, kept}`` of rows holding both ends (:func:`attach_text`) of
    complete pair groups; ``kept`` when its exact Jaccard reaches ``threshold``.

    Args:
        batch: ``key``, ``a``, ``b``, ``text`` rows, complete groups by ``(a, b)``.
        n_grams: words per shingle.
        threshold: minimum Jaccard.
    """
    keys = np.asarray(batch["key"], np.int64)
    a = np.asarray(batch["a"], np.int64)
    b = np.asarray(batch["b"], np.int64)
    texts = np.asarray(batch["text"], object)
    text_of: dict[tuple[int, int, int], str] = {}
    for r in range(keys.size):  # one row per pair end (repeats of a pair carry the same text)
        text_of.setdefault((int(a[r]), int(b[r]), int(keys[r])), texts[r])
    pairs = sorted({(x, y) for x, y, _ in text_of})
    kept = [
        (pa_, pb_, pa_) in text_of
        and (pa_, pb_, pb_) in text_of
        and exact_jaccard(text_of[(pa_, pb_, pa_)], text_of[(pa_, pb_, pb_)], n_grams) >= threshold
        for pa_, pb_ in pairs
    ]
    return {
        "a": np.array([p[0] for p in pairs], np.int64),
        "b": np.array([p[1] for p in pairs], np.int64),
        "kept": np.array(kept, dtype=bool),
    }
