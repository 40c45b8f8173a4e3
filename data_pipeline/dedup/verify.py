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


def shingle_set(text: str, n_grams: int) -> np.ndarray:
    """The sorted distinct word ``n_grams`` shingle hashes of ``text`` (what MinHash samples).

    Args:
        text: the text.
        n_grams: words per shingle.
    """
    return np.unique(shingle_hashes(text, n_grams))


def set_jaccard(sa: np.ndarray, sb: np.ndarray) -> float:
    """Jaccard of two shingle sets (:func:`shingle_set`); 1 for two empty sets.

    Args:
        sa: one set, sorted and distinct.
        sb: the other.
    """
    union = sa.size + sb.size
    if union == 0:
        return 1.0
    inter = np.intersect1d(sa, sb, assume_unique=True).size
    return inter / (union - inter)


def exact_jaccard(text_a: str, text_b: str, n_grams: int) -> float:
    """Exact Jaccard of the word ``n_grams`` shingle sets of two texts.

    Args:
        text_a: one text.
        text_b: the other.
        n_grams: words per shingle.
    """
    return set_jaccard(shingle_set(text_a, n_grams), shingle_set(text_b, n_grams))


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
    row_of: dict[tuple[int, int, int], int] = {}
    for r in range(keys.size):  # one row per pair end (repeats of a pair carry the same text)
        row_of.setdefault((int(a[r]), int(b[r]), int(keys[r])), r)
    # a document is in many pairs (every page of a site template): shingle it once per batch
    sets: dict[int, np.ndarray] = {}

    def shingles(pair: tuple[int, int], key: int) -> np.ndarray | None:
        r = row_of.get((*pair, key))
        if r is None:
            return None
        if key not in sets:
            sets[key] = shingle_set(texts[r], n_grams)
        return sets[key]

    pairs = sorted({(x, y) for x, y, _ in row_of})
    kept = []
    for p in pairs:
        sa, sb = shingles(p, p[0]), shingles(p, p[1])
        kept.append(sa is not None and sb is not None and set_jaccard(sa, sb) >= threshold)
    return {
        "a": np.array([p[0] for p in pairs], np.int64),
        "b": np.array([p[1] for p in pairs], np.int64),
        "kept": np.array(kept, dtype=bool),
    }
