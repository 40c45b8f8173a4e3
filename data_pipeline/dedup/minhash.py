"""MinHash signatures and LSH band keys, vectorised in numpy.

A document's text is simplified (lower case, digits to 0, punctuation to spaces), its UTF-8
bytes hashed per word with a polynomial hash computed from prefix sums, word hashes combined
into shingle (word n-gram) hashes, and the ``num_perm`` permutations ``(a*h + b) mod p`` applied
to all shingles at once. No Python loop runs per word or per shingle.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

from crucible.data_pipeline.spec import MinHashSpec

MERSENNE = np.uint64((1 << 61) - 1)
_U64 = np.uint64
_BYTE_BASE = _U64(0x100000001B3)  # FNV-64 prime: odd, so its powers never vanish mod 2^64
_GRAM_MULT = _U64(0x9E3779B97F4A7C15)
_MAX_WORD = 256  # longer "words" hash their first 256 bytes
_CHUNK = 4096  # shingles per block: bounds the (shingles x permutations) matrix
DIGITS_RE = re.compile(r"\d+")


@functools.cache
def _punct_table() -> dict[int, int]:
    space = ord(" ")
    return {
        c: space
        for c in range(0x3000)
        if unicodedata.category(chr(c))[0] in "PSZC" and chr(c) != " "
    }


@functools.cache
def _word_byte_mask() -> np.ndarray:
    # After simplification only ASCII space separates words; all other bytes belong to words.
    mask = np.ones(256, dtype=bool)
    mask[ord(" ")] = False
    return mask


@functools.cache
def _powers() -> np.ndarray:
    with np.errstate(over="ignore"):
        rest = np.cumprod(np.full(_MAX_WORD - 1, _BYTE_BASE, dtype=_U64))
    return np.concatenate(([_U64(1)], rest))


@functools.cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` parameters of ``num_perm`` permutations, ``a`` in [1, p), ``b`` in [0, p)."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, MERSENNE, size=num_perm, dtype=_U64)
    b = rng.randint(0, MERSENNE, size=num_perm, dtype=_U64)
    return a, b


def simplify(text: str) -> str:
    """Lower case, digits to ``0``, punctuation/symbols/whitespace to single spaces."""
    return " ".join(DIGITS_RE.sub("0", text.lower().translate(_punct_table())).split())


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: spreads the polynomial hashes over all 64 bits.
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def word_hashes(text: str) -> np.ndarray:
    """64-bit hash of each word of the simplified ``text`` (uint64 array)."""
    data = np.frombuffer(simplify(text).encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=_U64)
    is_word = _word_byte_mask()[data]
    starts = np.flatnonzero(is_word & ~np.concatenate(([False], is_word[:-1])))
    word_id = np.cumsum(is_word & ~np.concatenate(([False], is_word[:-1]))) - 1
    idx = np.flatnonzero(is_word)
    pos = idx - starts[word_id[idx]]
    keep = pos < _MAX_WORD
    idx, pos = idx[keep], pos[keep]
    with np.errstate(over="ignore"):
        contrib = (data[idx].astype(_U64) + _U64(1)) * _powers()[pos]
        # reduceat over each word's run of bytes (words are contiguous in idx)
        first = np.flatnonzero(np.concatenate(([True], word_id[idx][1:] != word_id[idx][:-1])))
        sums = np.add.reduceat(contrib, first)
    return _mix(sums)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of the word ``n``-grams of ``text`` (a document shorter than n is one shingle)."""
    w = word_hashes(text)
    if w.size == 0:
        return w
    m = max(w.size - n + 1, 1)
    k = min(n, w.size)
    acc = np.zeros(m, dtype=_U64)
    with np.errstate(over="ignore"):
        for j in range(k):  # n iterations over whole arrays, not per shingle
            acc = acc * _GRAM_MULT + w[j : j + m]
    return _mix(acc) & MERSENNE


def signature(text: str, spec: MinHashSpec) -> np.ndarray:
    """The MinHash signature (``num_perm`` uint64) of ``text``; all-max for empty text."""
    a, b = permutations(spec.num_perm, spec.seed)
    h = shingle_hashes(text, spec.n_grams)
    sig = np.full(spec.num_perm, MERSENNE, dtype=_U64)
    with np.errstate(over="ignore"):
        for i in range(0, h.size, _CHUNK):
            block = h[i : i + _CHUNK, None] * a[None, :]  # wraps modulo 2**64, as datatrove's
            block += b[None, :]
            # x % (2**61 - 1) without a division: fold the bits above 61 onto the low ones
            high = block >> _U64(61)
            block &= MERSENNE
            block += high
            np.subtract(block, MERSENNE, out=block, where=block >= MERSENNE)
            np.minimum(sig, block.min(axis=0), out=sig)
    return sig


def band_keys(sig: np.ndarray, spec: MinHashSpec) -> np.ndarray:
    """One uint64 key per LSH band: a hash of that band's ``rows_per_band`` signature values.

    Args:
        sig: a signature (``num_perm`` values), or signatures along the last axis.
        spec: the MinHash spec (bands and rows).
    """
    rows = sig.reshape(*sig.shape[:-1], spec.num_bands, spec.rows_per_band)
    acc = np.zeros(rows.shape[:-1], dtype=_U64)
    with np.errstate(over="ignore"):
        for j in range(spec.rows_per_band):
            acc = _mix(acc * _GRAM_MULT + rows[..., j])
    return acc
