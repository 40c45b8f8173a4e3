"""Word n-grams of a text, as 64-bit hashes.

A text is simplified as MinHash simplifies it (lower case, digits to 0, punctuation and symbols
to spaces: :func:`~crucible.data_pipeline.dedup.minhash.simplify`, datatrove's default text
normalisation) and split on spaces; n-gram ``i`` is words ``i .. i + n - 1``. A text shorter
than ``n`` words has no n-gram, so it can neither contaminate nor be contaminated.
"""

from __future__ import annotations

import numpy as np

from crucible.data_pipeline.dedup.minhash import _GRAM_MULT, _mix, simplify, word_hashes


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """The hash (uint64) of every word ``n``-gram of ``text``, in reading order (none when
    ``text`` has fewer than ``n`` words)."""
    w = word_hashes(text)
    if w.size < n:
        return np.zeros(0, dtype=np.uint64)
    m = w.size - n + 1
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # n passes over whole arrays, not a loop per n-gram
            acc = acc * _GRAM_MULT + w[j : j + m]
    return _mix(acc)


def ngram_text(text: str, n: int, i: int) -> str:
    """N-gram ``i`` of ``text`` as its simplified words (what :func:`ngram_hashes` hashed)."""
    return " ".join(simplify(text).split()[i : i + n])
