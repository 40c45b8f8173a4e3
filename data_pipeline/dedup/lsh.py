"""LSH bucketing: documents sharing a band key become edges of a similarity graph.

Each bucket emits a star (its smallest key joined to every other member), which keeps the
bucket's members connected with ``size - 1`` edges instead of ``size^2``.
"""

from __future__ import annotations

import numpy as np

from crucible.data_pipeline.dedup.exact import group_starts
from crucible.data_pipeline.dedup.minhash import _mix

_BAND_SALT = np.uint64(0xD6E8FEB86659FD93)


def explode_bands(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{key, bands[num_bands]}`` rows to one ``{bucket, key}`` row per band.

    Args:
        batch: ``key`` (int64) and ``bands`` (uint64, one list of band keys per document).
    """
    keys = np.asarray(batch["key"], dtype=np.int64)
    if keys.size == 0:
        return {"bucket": np.zeros(0, np.uint64), "key": keys}
    bands = np.stack([np.asarray(b, dtype=np.uint64) for b in batch["bands"]])
    nb = bands.shape[1]
    with np.errstate(over="ignore"):
        # the band index is mixed in, so equal values in different bands never share a bucket
        salt = _mix(np.arange(1, nb + 1, dtype=np.uint64) * _BAND_SALT)
        buckets = _mix(bands ^ salt[None, :])
    return {"bucket": buckets.reshape(-1), "key": np.repeat(keys, nb)}


def bucket_edges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Star edges ``{a, b}`` (``a`` the bucket's smallest key) of buckets with 2+ members.

    Args:
        batch: ``bucket`` and ``key`` columns holding complete buckets.
    """
    keys = np.asarray(batch["key"], dtype=np.int64)
    buckets = np.asarray(batch["bucket"], dtype=np.uint64)
    if keys.size == 0:
        return {"a": keys, "b": keys.copy()}
    order = np.lexsort((keys, buckets))
    k, bk = keys[order], buckets[order]
    start = group_starts(bk)
    centre = k[start]
    keep = centre != k
    return {"a": centre[keep], "b": k[keep]}
