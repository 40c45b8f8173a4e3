"""LSH bucketing with candidate verification.

Documents sharing a band key are candidates; a candidate pair becomes an edge of the similarity
graph only when the fraction of equal values of the two full signatures (the MinHash estimate
of their Jaccard) reaches the threshold. Banding alone keeps pairs far below the threshold
(14 x 8 bands pass a Jaccard-0.6 pair with probability 0.2), and connected components then
chain them into large false clusters; this false-positive check is the one text-dedup and NeMo
Curator run.

The signatures travel on the bucket rows, so on Ray the check runs inside the same
hash-partitioned reduce as the bucketing: no task ever holds every signature.
"""

from __future__ import annotations

import numpy as np

from crucible.data_pipeline.dedup.exact import group_starts
from crucible.data_pipeline.dedup.minhash import _mix

_BAND_SALT = np.uint64(0xD6E8FEB86659FD93)
# Buckets up to this size compare every pair of members; larger ones (thousands of copies of
# one boilerplate page) compare each member with the bucket's smallest key only.
MAX_ALL_PAIRS = 128
_PAIR_CHUNK = 1 << 16  # pairs compared per block: bounds the (pairs x num_perm) comparison


def compact_signature(sig: np.ndarray) -> np.ndarray:
    """The low 32 bits of each signature value (uint32), enough to compare signatures.

    Equal values stay equal; unequal ones collide with probability 2^-32, so the Jaccard
    estimate moves by less than 1e-9 while the rows that travel shrink by half.

    Args:
        sig: MinHash signature values (uint64), any shape.
    """
    return (np.asarray(sig, dtype=np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def as_matrix(column: np.ndarray, dtype: type) -> np.ndarray:
    """A column of equal-length lists (2-D array or object array of arrays) as a 2-D array.

    Args:
        column: the column as a batch holds it.
        dtype: the element type.
    """
    col = np.asarray(column)
    if col.dtype != object and col.ndim == 2:
        return col.astype(dtype, copy=False)
    if col.size == 0:
        return np.zeros((0, 0), dtype=dtype)
    return np.stack([np.asarray(v, dtype=dtype) for v in col])


def explode_bands(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{key, bands[num_bands], ...}`` rows to one ``{bucket, key, ...}`` row per band.

    Every other column (the signature, a row index) is repeated onto each band's row.

    Args:
        batch: ``key`` (int64), ``bands`` (uint64, one list of band keys per document) and
            any columns to carry.
    """
    keys = np.asarray(batch["key"], dtype=np.int64)
    rest = {k: v for k, v in batch.items() if k not in ("key", "bands")}
    if keys.size == 0:
        out = {"bucket": np.zeros(0, np.uint64), "key": keys}
        out.update({k: np.asarray(v)[:0] for k, v in rest.items()})
        return out
    bands = as_matrix(batch["bands"], np.uint64)
    nb = bands.shape[1]
    with np.errstate(over="ignore"):
        # the band index is mixed in, so equal values in different bands never share a bucket
        salt = _mix(np.arange(1, nb + 1, dtype=np.uint64) * _BAND_SALT)
        buckets = _mix(bands ^ salt[None, :])
    out = {"bucket": buckets.reshape(-1), "key": np.repeat(keys, nb)}
    for k, v in rest.items():
        out[k] = np.repeat(as_matrix(v, np.uint32) if k == "signature" else v, nb, axis=0)
    return out


def candidate_pairs(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(i, j)``, ``j < i``, that share a bucket, for rows sorted by bucket.

    Every pair in buckets of up to :data:`MAX_ALL_PAIRS` rows; in larger buckets each row
    with the bucket's first row.

    Args:
        buckets: bucket of each row, sorted.
    """
    n = buckets.size
    start = group_starts(buckets)
    pos = np.arange(n) - start
    group = np.cumsum(pos == 0) - 1
    small = np.bincount(group)[group] <= MAX_ALL_PAIRS
    counts = np.where(small, pos, 0)
    i = np.repeat(np.arange(n), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    j = start[i] + (np.arange(i.size) - offsets)
    big = np.flatnonzero(~small & (pos > 0))
    return np.concatenate([i, big]), np.concatenate([j, start[big]])


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal values of paired signature rows (the MinHash Jaccard estimate).

    Args:
        sig_a: signatures, ``(pairs, num_perm)``.
        sig_b: the signatures they are paired with, same shape.
    """
    return (sig_a == sig_b).mean(axis=1)


def bucket_edges(
    batch: dict[str, np.ndarray], threshold: float, margin: float = 0.0
) -> dict[str, np.ndarray]:
    """Checked edges ``{a, b, sure}`` (``a < b``) between members of the same bucket.

    A pair whose estimate is at least ``threshold + margin`` is an edge (``sure``); one within
    ``margin`` of the threshold is kept with ``sure`` false, for an exact check; the rest are
    dropped. One edge per bucket a pair shares (a pair in several buckets repeats; later
    stages remove repeats), so the count does not depend on how buckets are batched.

    Args:
        batch: ``bucket``, ``key`` and ``signature`` (``(rows, num_perm)``) columns holding
            complete buckets.
        threshold: minimum Jaccard of an edge.
        margin: half-width of the uncertain band around ``threshold`` (0: none).
    """
    keys = np.asarray(batch["key"], dtype=np.int64)
    empty = {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "sure": np.zeros(0, bool)}
    if keys.size < 2:
        return empty
    buckets = np.asarray(batch["bucket"], dtype=np.uint64)
    order = np.lexsort((keys, buckets))
    k, bk = keys[order], buckets[order]
    i, j = candidate_pairs(bk)
    i, j = i[k[i] != k[j]], j[k[i] != k[j]]
    if i.size == 0:
        return empty
    sig = as_matrix(batch["signature"], np.uint32)[order]
    est = np.zeros(i.size, dtype=np.float64)
    for s in range(0, i.size, _PAIR_CHUNK):
        est[s : s + _PAIR_CHUNK] = estimate_jaccard(
            sig[i[s : s + _PAIR_CHUNK]], sig[j[s : s + _PAIR_CHUNK]]
        )
    # a small tolerance so that 90/112 >= 0.8 style comparisons are not lost to rounding
    keep = est >= threshold - margin - 1e-12
    # rows are sorted by key within a bucket, so a < b
    return {"a": k[j[keep]], "b": k[i[keep]], "sure": est[keep] >= threshold + margin - 1e-12}
