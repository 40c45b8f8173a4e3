"""Exact dedup: a 128-bit hash of the final normalised text; the smallest key per hash survives.

:func:`exact_duplicates` takes any batch that holds complete hash groups: the in-process
executor passes everything at once, the Ray executor each group of a hash-partitioned groupby.
"""

from __future__ import annotations

import numpy as np
import xxhash


def text_hash(text: str) -> str:
    """Hex xxh3-128 of ``text`` (the text is already normalised by then)."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first row of each row's group in an array sorted by group."""
    n = sorted_keys.shape[0]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.maximum.accumulate(np.where(first, np.arange(n), 0))


def exact_duplicates(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows that repeat an earlier text: ``{key, dup_of}`` (``dup_of``: the group's smallest key).

    Args:
        batch: ``key`` (int64) and ``text_hash`` (str) columns holding complete hash groups.
    """
    keys = np.asarray(batch["key"], dtype=np.int64)
    hashes = np.asarray(batch["text_hash"]).astype(str)
    if keys.size == 0:
        return {"key": keys, "dup_of": keys.copy()}
    order = np.lexsort((keys, hashes))
    k, h = keys[order], hashes[order]
    start = group_starts(h)
    dup = start != np.arange(k.size)
    return {"key": k[dup], "dup_of": k[start[dup]]}
