"""Which training documents share an n-gram with an eval set: a join partitioned by hash.

1. each eval file is indexed by a task (:func:`~.eval_sets.index_eval_file`): its distinct n-gram
   hashes as ``{hash, key = -(set + 1)}`` rows in a Parquet file;
2. every filtered document becomes one ``{hash, key}`` row per distinct n-gram
   (:func:`doc_ngrams`);
3. the two are shuffled together by ``hash``: each partition holds complete hash groups of
   both sides, and :func:`join_ngrams` keeps the training rows whose hash an eval row has.

So neither side is ever held by one task: a partition holds its share of the eval n-grams and
of the training n-grams. The ``{key, hash, set}`` matches are written by part for the finalise
stage (:mod:`.apply`), which picks each document's first contaminated n-gram.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.batches import column_bytes, num_rows
from crucible.data_pipeline.decontam.eval_sets import index_eval_file
from crucible.data_pipeline.decontam.ngrams import ngram_hashes
from crucible.data_pipeline.executors.base import Executor
from crucible.data_pipeline.spec import DecontaminationSpec

NGRAM_ROW_BYTES = 16  # a {hash, key} row
WORD_BYTES = 5  # about the UTF-8 bytes of a word and its space, for sizing the shuffle


def doc_ngrams(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One ``{hash, key}`` row per distinct word ``n``-gram of each document.

    Args:
        batch: ``key`` (int64) and ``text`` columns.
        n: words per n-gram.
    """
    keys = np.asarray(batch["key"], np.int64)
    hashes = [np.unique(ngram_hashes(str(t), n)) for t in batch["text"]]
    counts = np.array([h.size for h in hashes], dtype=np.int64)
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    return {"hash": flat.astype(np.uint64), "key": np.repeat(keys, counts)}


def join_ngrams(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{key, hash, set}`` of every training row whose hash is an eval n-gram's (``set``: the
    first eval set, in spec order, holding it).

    Args:
        batch: eval rows (``key < 0``) and training rows, complete groups by ``hash``.
    """
    h = np.asarray(batch["hash"], np.uint64)
    k = np.asarray(batch["key"], np.int64)
    is_eval = k < 0
    eh, es = h[is_eval], -k[is_eval] - 1
    dh, dk = h[~is_eval], k[~is_eval]
    if eh.size == 0 or dh.size == 0:
        return {"key": dk[:0], "hash": dh[:0], "set": np.zeros(0, np.int32)}
    order = np.lexsort((es, eh))
    eh, es = eh[order], es[order]
    first = np.concatenate(([True], eh[1:] != eh[:-1]))
    eh, es = eh[first], es[first]
    pos = np.minimum(np.searchsorted(eh, dh), eh.size - 1)
    hit = eh[pos] == dh
    out_k, out_h, out_s = dk[hit], dh[hit], es[pos[hit]]
    order = np.lexsort((out_h, out_k))
    return {"key": out_k[order], "hash": out_h[order], "set": out_s[order].astype(np.int32)}


def find_overlaps(
    ex: Executor,
    files: Sequence[Location],
    out_dir: Location,
    dc: DecontaminationSpec,
    eval_files: list[dict[str, Any]],
) -> dict[str, Any]:
    """Index the eval files, join their n-grams with the filtered ``files``' and write the
    ``{key, hash, set}`` matches by part into ``out_dir/matches``.

    Args:
        ex: the executor.
        files: the filtered parts (``key`` and ``text`` columns).
        out_dir: the new result directory.
        dc: the decontamination spec.
        eval_files: ``{set, path}`` of every eval file (see
            :func:`~.eval_sets.eval_files`).

    Returns:
        Per eval set: files, texts, texts too short to have an n-gram, n-grams (distinct per
        file), bad lines; and the number of matching (document, n-gram) pairs.
    """
    names = list(dc.eval_sets)
    items = [
        {
            **f,
            "fields": dc.eval_sets[names[f["set"]]].fields,
            "out": (out_dir / f"eval/{i}.parquet").uri,
        }
        for i, f in enumerate(eval_files)
    ]
    per_set = {
        name: {"files": 0, "texts": 0, "short_texts": 0, "ngrams": 0, "bad_lines": 0}
        for name in names
    }
    for i, s in ex.run_tasks(items, functools.partial(index_eval_file, n=dc.n_grams)):
        dst = per_set[names[items[i]["set"]]]
        dst["files"] += 1
        for k, v in s.items():
            dst[k] += v
    stats: dict[str, Any] = {"eval_sets": per_set, "matches": 0}
    n_eval = sum(s["ngrams"] for s in per_set.values())
    matches_dir = out_dir / "matches"
    if n_eval == 0:
        matches_dir.mkdirs()
        return stats
    evals = ex.read_parquet([location(it["out"]) for it in items], ["hash", "key"])
    text_bytes, n_docs = column_bytes(files, ["text"]), num_rows(files)
    per_doc = NGRAM_ROW_BYTES * text_bytes // max(n_docs, 1) // WORD_BYTES
    docs = ex.map_batches(
        ex.read_parquet(files, ["key", "text"]),
        functools.partial(doc_ngrams, n=dc.n_grams),
        out_row_bytes=max(per_doc, 1),
    )
    nbytes = NGRAM_ROW_BYTES * (text_bytes // WORD_BYTES + n_eval)
    matches = ex.materialize(
        ex.shuffle(ex.union(evals, docs), ["hash"], join_ngrams, nbytes=nbytes)
    )
    ex.write_by_part(matches, matches_dir)
    stats["matches"] = ex.count(matches)
    return stats
