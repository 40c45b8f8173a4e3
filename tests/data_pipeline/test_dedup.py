"""MinHash LSH recall/precision against exact Jaccard, connected components against union-find."""

from __future__ import annotations

import random

import numpy as np
from dedup_quality import components_union_find, similar_pairs  # bench/, on sys.path

from crucible.data_pipeline.dedup.components import connected_components
from crucible.data_pipeline.dedup.exact import exact_duplicates, text_hash
from crucible.data_pipeline.dedup.lsh import bucket_edges, compact_signature, explode_bands
from crucible.data_pipeline.dedup.minhash import (
    MERSENNE,
    band_keys,
    permutations,
    shingle_hashes,
    signature,
    simplify,
)
from crucible.data_pipeline.dedup.verify import exact_jaccard
from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.sample import make_text, near_duplicate
from crucible.data_pipeline.spec import MinHashSpec


def components(edges: dict) -> tuple[dict, int]:
    """Connected components of in-memory edges on the in-process executor."""
    ex = LocalExecutor()
    labels, rounds = connected_components(ex, ex.from_batch(edges))
    (batch,) = labels
    return batch, rounds


def test_signature_estimates_jaccard() -> None:
    rng = random.Random(1)
    spec = MinHashSpec(num_bands=32, rows_per_band=8)
    for target in (0.3, 0.6, 0.9):
        a = make_text(rng, "en", 600)
        b = near_duplicate(rng, a, target)
        est = float((signature(a, spec) == signature(b, spec)).mean())
        assert abs(est - exact_jaccard(a, b, 5)) < 0.1
    assert simplify("Hello, World! 2024") == "hello world 0"


def test_signature_is_datatrove_permutation_minimum() -> None:
    """min over shingles of (a*h + b) mod 2**64 mod (2**61 - 1), as datatrove computes it; band
    keys of a stack of signatures are those of each one."""
    rng = random.Random(2)
    spec = MinHashSpec()
    a, b = permutations(spec.num_perm, spec.seed)
    texts = [make_text(rng, "en", rng.randint(1, 300)) for _ in range(20)]
    with np.errstate(over="ignore"):
        for text in texts:
            h = shingle_hashes(text, spec.n_grams)
            want = ((h[:, None] * a[None, :] + b[None, :]) % MERSENNE).min(axis=0)
            assert np.array_equal(signature(text, spec), want)
    sigs = np.stack([signature(t, spec) for t in texts])
    assert np.array_equal(band_keys(sigs, spec), [band_keys(s, spec) for s in sigs])


def test_exact_duplicates_keep_smallest_key() -> None:
    h = [text_hash(t) for t in ("a", "b", "a", "c", "a", "b")]
    out = exact_duplicates({"key": np.array([5, 1, 3, 9, 0, 7]), "text_hash": np.array(h)})
    got = dict(zip(out["key"].tolist(), out["dup_of"].tolist(), strict=True))
    assert got == {3: 0, 5: 0, 7: 1}


def test_lsh_candidates_recall_against_exact_jaccard() -> None:
    """Banding alone (threshold 0: no check) finds the pairs at Jaccard >= 0.8."""
    rng = random.Random(3)
    spec = MinHashSpec()
    texts = [make_text(rng, "en", rng.randint(150, 400)) for _ in range(150)]
    texts += [
        near_duplicate(rng, texts[rng.randrange(150)], rng.uniform(0.5, 1.0)) for _ in range(150)
    ]
    texts += [texts[rng.randrange(150)] for _ in range(20)]
    n = len(texts)
    sigs = np.array([signature(t, spec) for t in texts])
    bands = np.array([band_keys(s, spec) for s in sigs])
    rows = explode_bands(
        {"key": np.arange(n), "bands": bands, "signature": compact_signature(sigs)}
    )
    edges = bucket_edges(rows, threshold=0.0)
    assert edges["sure"].all() and (edges["a"] < edges["b"]).all()
    labels, _ = components(edges)
    root = dict(zip(labels["key"].tolist(), labels["root"].tolist(), strict=True))
    i, j, _ = similar_pairs(texts, 5, threshold=0.8)
    truth = set(zip(i.tolist(), j.tolist(), strict=True))
    assert truth, "the corpus must contain true near-duplicate pairs"
    found = {(i, j) for i, j in truth if root.get(i, i) == root.get(j, j)}
    assert len(found) / len(truth) >= 0.95


def test_distributed_components_equal_union_find() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        n = int(rng.integers(50, 3000))
        m = int(rng.integers(10, 3000))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        chain = rng.permutation(n)[: n // 3]  # long paths need many rounds
        a = np.concatenate([a, chain[:-1]])
        b = np.concatenate([b, chain[1:]])
        keep = a != b
        edges = {"a": a[keep], "b": b[keep]}
        labels, _ = components(edges)
        got = dict(zip(labels["key"].tolist(), labels["root"].tolist(), strict=True))
        expected = {k: r for k, r in components_union_find(edges).items() if k != r}
        assert got == expected
