"""Exact dedup: a 128-bit hash of the final normalised text; the smallest key per hash survives.

:func:`exact_duplicates` takes any batch that holds complete hash groups: the in-process
executor passes everything at once, the Ray executor each partition of a shuffle by hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

from crucible.cluster.storage import Location
from crucible.data_pipeline.batches import column_bytes
from crucible.data_pipeline.executors.base import Executor


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


def exact_dedup(ex: Executor, files: Sequence[Location], out_dir: Location) -> dict[str, Any]:
    """Find the exact duplicates among the filtered ``files`` (a shuffle by text hash) and
    write their ``{key, dup_of}`` rows by part into ``out_dir``.

    Args:
        ex: the executor.
        files: the filtered parts (``key`` and ``text_hash`` columns).
        out_dir: the new result directory.
    """
    columns = ["key", "text_hash"]
    rows = ex.read_parquet(files, columns)
    nbytes = column_bytes(files, columns)
    dups = ex.materialize(ex.shuffle(rows, ["text_hash"], exact_duplicates, nbytes=nbytes))
    ex.write_by_part(dups, out_dir)
    return {"duplicates": ex.count(dups)}
