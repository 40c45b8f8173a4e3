"""Candidate verification and the exact ground truth: F1 >= 0.95 at Jaccard 0.8."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dedup_quality import dedup_scores, similar_pairs, true_clusters  # bench/, on sys.path

from crucible.data_pipeline.dedup.lsh import MAX_ALL_PAIRS, bucket_edges, candidate_pairs
from crucible.data_pipeline.dedup.minhash import simplify
from crucible.data_pipeline.dedup.verify import (
    attach_text,
    doc_rows,
    exact_edges,
    exact_jaccard,
    pair_ends,
)
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.sample import make_text, near_duplicate
from crucible.data_pipeline.spec import DataSpec, MinHashSpec


def tuple_jaccard(a: str, b: str, n: int = 5) -> float:
    """Test oracle: Jaccard of word n-gram tuples, independent of the shingle hashing."""

    def grams(t: str) -> set[tuple[str, ...]]:
        w = simplify(t).split()
        return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def planted_texts(seed: int, originals: int = 200, near: int = 300, exact: int = 20) -> list[str]:
    """Originals, near-duplicates at Jaccard spread over 0.5-0.98, exact copies."""
    rng = random.Random(seed)
    texts = [make_text(rng, "en", rng.randint(150, 400)) for _ in range(originals)]
    for _ in range(near):
        texts.append(near_duplicate(rng, texts[rng.randrange(originals)], rng.uniform(0.5, 0.98)))
    texts += [texts[rng.randrange(originals)] for _ in range(exact)]
    return texts


def test_similar_pairs_equal_brute_force() -> None:
    texts = planted_texts(5, originals=50, near=70, exact=5)
    i, j, jac = similar_pairs(texts, 5, threshold=0.3)
    got = dict(zip(zip(i.tolist(), j.tolist(), strict=True), jac.tolist(), strict=True))
    expected = {}
    for a, b in itertools.combinations(range(len(texts)), 2):
        x = tuple_jaccard(texts[a], texts[b])  # tuple shingles: independent of the hashing
        if x >= 0.3:
            expected[(a, b)] = x
    assert expected and set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in expected) < 1e-12
    clusters = true_clusters(len(texts), i, j)
    assert sum(len(c) for c in clusters) == len({x for p in expected for x in p})


def test_dedup_scores() -> None:
    clusters = [[0, 1, 2], [5, 6]]
    assert dedup_scores(clusters, [1, 2, 6])["f1"] == 1.0
    s = dedup_scores(clusters, [0, 1, 2, 9])  # a whole cluster removed, and an unrelated doc
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(2 / 3, abs=1e-4)


def test_candidate_pairs_small_and_big_buckets() -> None:
    buckets = np.array([1, 1, 1, 2, 3, 3], dtype=np.uint64)
    i, j = candidate_pairs(buckets)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(1, 0), (2, 0), (2, 1), (5, 4)]
    big = np.zeros(MAX_ALL_PAIRS + 5, dtype=np.uint64)
    i, j = candidate_pairs(np.concatenate([big, np.ones(3, np.uint64)]))
    pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    n = big.size
    # the big bucket: each member with its first; the small one: all pairs
    assert pairs == {(r, 0) for r in range(1, n)} | {(n + 1, n), (n + 2, n), (n + 2, n + 1)}


def test_bucket_edges_threshold_and_margin() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, 112, dtype=np.uint32)
    sigs = [base.copy() for _ in range(4)]
    # key k differs from key 0 in its first 10 / 20 / 40 values: key pairs (0, 1) and (1, 2)
    # estimate 0.911, (0, 2) and (2, 3) 0.821, (1, 3) 0.732, (0, 3) 0.643
    for k, changed in ((1, 10), (2, 20), (3, 40)):
        sigs[k][:changed] ^= np.uint32(1)
    batch = {
        "bucket": np.zeros(4, np.uint64),
        "key": np.array([3, 2, 1, 0]),
        "signature": np.stack(sigs[::-1]),
    }
    strict = bucket_edges(batch, threshold=0.8)
    assert {(a, b) for a, b in zip(strict["a"], strict["b"], strict=True)} == {
        (0, 1),
        (0, 2),
        (1, 2),
        (2, 3),
    }
    assert strict["sure"].all()
    loose = bucket_edges(batch, threshold=0.8, margin=0.1)
    got = {(a, b): s for a, b, s in zip(loose["a"], loose["b"], loose["sure"], strict=True)}
    assert got[(0, 1)] and not got[(0, 2)] and not got[(1, 3)] and (0, 3) not in got


def test_exact_check_through_both_groupings() -> None:
    rng = random.Random(2)
    a = make_text(rng, "en", 300)
    texts = [a, near_duplicate(rng, a, 0.9), near_duplicate(rng, a, 0.6), make_text(rng)]
    assert exact_jaccard(texts[0], texts[1], 5) == pytest.approx(tuple_jaccard(texts[0], texts[1]))
    pairs = {"a": np.array([0, 0, 0, 0]), "b": np.array([1, 1, 2, 3])}  # (0, 1) repeated
    rows = {
        k: np.concatenate([v, w])
        for (k, v), w in zip(
            pair_ends(pairs).items(),
            doc_rows({"key": np.arange(4), "text": np.array(texts, object)}).values(),
            strict=True,
        )
    }
    ends = attach_text(rows)
    perm = np.random.default_rng(1).permutation(ends["key"].size)
    out = exact_edges({k: v[perm] for k, v in ends.items()}, n_grams=5, threshold=0.8)
    assert out["a"].tolist() == [0, 0, 0] and out["b"].tolist() == [1, 2, 3]
    assert out["kept"].tolist() == [True, False, False]


def test_exact_check_shingles_each_document_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # template pages: every page of a site is a candidate of every other (a star of pairs
    # here); shingling both texts per pair made the exact check cost ~30x the signature check
    import crucible.data_pipeline.dedup.verify as verify

    rng = random.Random(4)
    chrome = make_text(rng, "en", 200)
    texts = [f"{chrome}\n{make_text(rng, 'en', n)}" for n in (8, 8, 8, 80, 80, 8)]
    pairs = {"a": np.array([0, 0, 0, 0, 0, 1]), "b": np.array([1, 2, 3, 4, 5, 2])}
    docs = doc_rows({"key": np.arange(6), "text": np.array(texts, object)})
    ends = attach_text({k: np.concatenate([v, docs[k]]) for k, v in pair_ends(pairs).items()})
    calls: list[str] = []
    real = verify.shingle_set
    monkeypatch.setattr(verify, "shingle_set", lambda t, n: calls.append(t) or real(t, n))
    out = exact_edges(ends, n_grams=5, threshold=0.8)
    assert len(calls) == 6 and sorted(calls) == sorted(texts)
    expected = [
        exact_jaccard(texts[a], texts[b], 5) >= 0.8 for a, b in zip(out["a"], out["b"], strict=True)
    ]
    assert out["kept"].tolist() == expected and out["a"].size == 6
    assert any(expected) and not all(expected)


def run_and_score(texts: list[str], tmp: Path, minhash: dict) -> tuple[dict, dict]:
    """The pipeline (fuzzy dedup only) on ``texts``; document-level scores at J 0.8."""
    inp = tmp / "in"
    inp.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"d{i:05d}", "text": t}) for i, t in enumerate(texts)]
    (inp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    off = {"enabled": False}
    spec = DataSpec(
        inputs=[str(inp)],
        language=off,
        gopher_repetition=off,
        gopher_quality=off,
        c4=off,
        fineweb=off,
        pii=off,
        dedup={"exact": off, "minhash": minhash},
    )
    run = tmp / "run"
    stats = run_pipeline(spec, run, executor="local", progress=False)
    exc = pq.read_table(sorted((run / "exclusions").glob("part-*.parquet")))
    removed = [int(i[1:]) for i in exc.column("id").to_pylist()]
    i, j, _ = similar_pairs(texts, 5, threshold=0.8)
    return dedup_scores(true_clusters(len(texts), i, j), removed), stats


def test_pipeline_f1_at_jaccard_08(tmp_path: Path) -> None:
    texts = planted_texts(11)
    scores, stats = run_and_score(texts, tmp_path / "exact", {})
    assert scores["f1"] >= 0.95, scores
    assert stats["dedup"]["minhash"]["exact_checked"] > 0
    # without the check, LSH candidates chain far-apart documents into false clusters
    unchecked, _ = run_and_score(texts, tmp_path / "none", {"threshold": 0.0})
    assert unchecked["f1"] < 0.95 and unchecked["precision"] < scores["precision"], unchecked


def test_margin_is_three_standard_errors() -> None:
    spec = MinHashSpec()
    assert spec.margin == pytest.approx(3 * (0.8 * 0.2 / 112) ** 0.5)
    assert MinHashSpec(verify="signature").margin == 0.0
    assert MinHashSpec(threshold=0.0).margin == 0.0
