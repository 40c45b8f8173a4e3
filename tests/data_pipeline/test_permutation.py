"""Feistel sample order: a bijection for every n, deterministic, slice-consistent, well mixed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crucible.data_pipeline.permutation import FeistelPermutation
from crucible.errors import CrucibleError


def _chi2_z(counts: np.ndarray) -> float:
    """Pearson's chi-square of ``counts`` against a uniform expectation, as a z-score (its
    distribution under uniformity is close to N(0, 1) at these degrees of freedom)."""
    expected = counts.sum() / counts.size
    x = ((counts - expected) ** 2 / expected).sum()
    df = counts.size - 1
    return float((x - df) / np.sqrt(2 * df))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 1000, 4097, 65536, 100003])
def test_bijection(n: int) -> None:
    perm = FeistelPermutation(n, seed=3, epoch=1)
    out = perm(np.arange(n))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    np.testing.assert_array_equal(perm.inverse(out), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    seed=st.integers(-(2**63), 2**64),
    epoch=st.integers(0, 10**6),
)
def test_bijection_property(n: int, seed: int, epoch: int) -> None:
    out = FeistelPermutation(n, seed, epoch)(np.arange(n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_deterministic_and_keyed() -> None:
    n = 1000
    idx = np.arange(n)
    base = FeistelPermutation(n, seed=7, epoch=2)(idx)
    np.testing.assert_array_equal(FeistelPermutation(n, seed=7, epoch=2)(idx), base)
    for seed, epoch in [(7, 3), (8, 2), (2, 7)]:
        other = FeistelPermutation(n, seed, epoch)(idx)
        assert (other != base).mean() > 0.9, (seed, epoch)


def test_pinned_order() -> None:
    """The order is part of a checkpoint's meaning (resume replays it): any change to the
    construction (rounds, mixer, key derivation) must be deliberate."""
    assert FeistelPermutation(10, 0, 0)(np.arange(10)).tolist() == [5, 0, 7, 4, 3, 9, 6, 2, 1, 8]
    n = 10**10
    assert FeistelPermutation(n, 0, 0)(np.array([0, 1, 2, n - 1])).tolist() == [
        6939916690,
        7109230148,
        4251139813,
        6219366736,
    ]


@pytest.mark.parametrize("n", [17, 4096, 100003])
def test_slice_matches_full_order(n: int) -> None:
    perm = FeistelPermutation(n, seed=1, epoch=0)
    full = perm(np.arange(n))
    for a, b in [(0, 1), (0, n), (n // 3, n // 2), (n - 5, n)]:
        np.testing.assert_array_equal(perm(np.arange(a, b)), full[a:b])
    scattered = np.random.default_rng(0).integers(0, n, size=(10, 10))
    np.testing.assert_array_equal(perm(scattered), full[scattered])


def test_statistics_of_one_order() -> None:
    """A uniform random permutation of n has mean |π(i) - i| = (n² - 1) / 3n (std of the mean
    ~0.1% here), 1 fixed point on average (Poisson), and no correlation between π(i) and
    π(i + 1) (std 1/√n ≈ 0.003). The seeds are fixed, so the test is deterministic."""
    n = 10**5
    i = np.arange(n)
    for seed in range(3):
        out = FeistelPermutation(n, seed, epoch=0)(i)
        displacement = np.abs(out - i).mean()
        assert displacement == pytest.approx((n * n - 1) / (3 * n), rel=0.02)
        assert (out == i).sum() <= 8
        assert abs(np.corrcoef(out[:-1], out[1:])[0, 1]) < 0.02
        assert (np.abs(np.diff(out)) == 1).sum() <= 10  # expected 2 for a uniform permutation


def test_inputs_differing_in_the_left_half_are_spread() -> None:
    """Few rounds leave inputs that differ only in their left half (here n = 4^8, halves of 8
    bits) at visibly non-uniform distances; with the chosen rounds, (π(i ⊕ 2^8) - π(i)) mod n
    is uniform within chance (z of a 256-bin chi-square)."""
    n = 4**8
    perm = FeistelPermutation(n, seed=0, epoch=0)
    i = np.arange(n)
    distance = (perm(i ^ 256) - perm(i)) % n
    assert abs(_chi2_z(np.bincount(distance * 256 // n, minlength=256))) < 4


def test_pairs_uniform_across_keys_on_a_tiny_domain() -> None:
    """Over many seeds, (π(0), π(1)) of n = 8 (2-bit halves, where a Feistel network mixes
    worst) falls in each of the 56 ordered pairs equally often within chance."""
    n, seeds = 8, 1120
    counts = np.zeros((n, n), np.int64)
    for seed in range(seeds):
        a, b = FeistelPermutation(n, seed, epoch=0)(np.arange(2))
        counts[a, b] += 1
    assert abs(_chi2_z(counts[~np.eye(n, dtype=bool)])) < 4


def test_large_n_near_the_end() -> None:
    n = 10**10
    out = FeistelPermutation(n, seed=0, epoch=5)(np.arange(n - 10**5, n))
    assert out.min() >= 0 and out.max() < n
    assert np.unique(out).size == 10**5


def test_largest_domain_round_trips() -> None:
    """Halves of 32 bits: no overflow in the uint64 arithmetic."""
    n = 2**63 - 1
    perm = FeistelPermutation(n, seed=1, epoch=1)
    idx = np.array([0, 1, 2**62, n - 2, n - 1])
    out = perm(idx)
    assert ((out >= 0) & (out < n)).all() and np.unique(out).size == idx.size
    np.testing.assert_array_equal(perm.inverse(out), idx)


def test_rejects_out_of_range() -> None:
    with pytest.raises(CrucibleError, match="count"):
        FeistelPermutation(0, 0, 0)
    perm = FeistelPermutation(10, 0, 0)
    with pytest.raises(CrucibleError, match=r"\[0, 10\)"):
        perm(np.array([3, 10]))
    with pytest.raises(CrucibleError, match=r"\[0, 10\)"):
        perm(np.array([-1]))
