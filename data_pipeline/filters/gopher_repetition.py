"""Gopher repetition rules (Rae et al. 2021, table A1), as datatrove defines them.

The n-gram rules run on integer ids rather than joined strings, with the same results:
``top_n_grams`` counts n-grams joined by spaces (words hold no whitespace, so equal strings are
equal word sequences); ``dup_n_grams`` compares n-grams joined with no separator, as datatrove
does, so two different word sequences can be one string ("a bc" and "ab c"): those are grouped
by a hash of their characters, and every group is checked against the strings themselves.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import GopherRepetitionSpec
from crucible.data_pipeline.text import split_words

PARAGRAPH_RE = re.compile(r"\n{2,}")
LINE_RE = re.compile(r"\n+")
_U64 = np.uint64
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number, total characters) of items that repeat an earlier item."""
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for x in items:
        if x in seen:
            dup_n += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup_n, dup_chars


@functools.lru_cache(maxsize=2)
def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``BASE**k`` and ``BASE**-k`` modulo 2**64 for k < ``size`` (a power of two)."""
    base = np.full(size, _BASE, dtype=_U64)
    inv = np.full(size, pow(_BASE, -1, 2**64), dtype=_U64)
    base[0] = inv[0] = 1
    return np.cumprod(base), np.cumprod(inv)  # uint64 products wrap modulo 2**64


def _first_seen(keys: np.ndarray) -> np.ndarray:
    """For each position, the first position holding the same key."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.empty(order.size, dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.empty_like(order)
    # the sort is stable, so a run's first element is its key's first position
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


class _Grams:
    """One document's words, for the n-gram rules."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = words
        self.joined = "".join(words)  # datatrove's n-gram strings are slices of this
        self.offsets = np.zeros(len(words) + 1, dtype=np.int64)  # of each word in ``joined``
        np.cumsum([len(w) for w in words], out=self.offsets[1:])
        # _firsts[k - 1]: for each k-gram, the first position of an equal one
        seen: dict[str, int] = {}
        ids = map(seen.setdefault, words, range(len(words)))
        self._firsts = [np.fromiter(ids, dtype=np.int64, count=len(words))]

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent space-joined n-gram (length times count)."""
        m = len(self.words) - n + 1
        if m <= 0:
            return 0
        size, words = len(self.words), self._firsts[0]
        while len(self._firsts) < n:  # a k-gram and the next word make a (k+1)-gram
            k = len(self._firsts)
            self._firsts.append(_first_seen(self._firsts[-1][: size - k] * size + words[k:]))
        counts = np.bincount(self._firsts[n - 1], minlength=m)
        best = int(counts.max())
        # Counter.most_common(1) answers the first-inserted of equally frequent n-grams
        at = int(np.flatnonzero(counts == best)[0])
        length = int(self.offsets[at + n] - self.offsets[at]) + n - 1
        return length * best

    def duplicate_chars(self, ns: list[int]) -> dict[int, int]:
        """For each n of ``ns``: characters in n-grams (joined with no separator) that repeat
        an earlier one, the scan skipping past each repeat."""
        out = dict.fromkeys(ns, 0)
        ns = [n for n in ns if len(self.words) - n + 1 > 0]
        if not ns:
            return out
        starts = [self.offsets[: len(self.words) - n + 1] for n in ns]
        ends = [self.offsets[n:] for n in ns]
        # one sort for every n: each n's hashes are told apart by a multiple of an odd number
        salt = np.repeat(np.arange(len(ns), dtype=_U64), [s.size for s in starts])
        hashes = self._hashes(np.concatenate(starts), np.concatenate(ends))
        first = _first_seen(hashes ^ (salt * _U64(_BASE)))
        at = 0
        for n, start in zip(ns, starts, strict=True):
            out[n] = self._scan(n, first[at : at + start.size] - at)
            at += start.size
        return out

    def _scan(self, n: int, first: np.ndarray) -> int:
        """datatrove's scan over the n-grams (``first``: each one's first equal position),
        visiting only n-grams that occur more than once: the others never change its course."""
        if first.min() < 0:  # a hash equal to another n's
            return _duplicate_chars_of_strings(self.words, n)
        shared = np.flatnonzero(np.bincount(first, minlength=first.size)[first] > 1)
        text, offsets = self.joined, self.offsets.tolist()
        seen: set[int] = set()
        repeated = resume = 0  # the scan's next position after the last repeat
        for i, name in zip(shared.tolist(), first[shared].tolist(), strict=True):
            if (
                name != i
                and text[offsets[i] : offsets[i + n]] != text[offsets[name] : offsets[name + n]]
            ):
                return _duplicate_chars_of_strings(self.words, n)  # a hash collision
            if i < resume:
                continue
            if name in seen:
                repeated += offsets[i + n] - offsets[i]
                resume = i + n
            else:
                seen.add(name)
        return repeated

    def _hashes(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Polynomial hash modulo 2**64 of each ``joined[start:end]``."""
        codes = np.frombuffer(self.joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        power, inverse = _powers(1 << max(codes.size.bit_length(), 10))
        prefix = np.zeros(codes.size + 1, dtype=_U64)
        np.cumsum(codes.astype(_U64) * inverse[: codes.size], out=prefix[1:])
        # sum of c[t] * BASE**(end-1-t) over [start, end) = BASE**(end-1) * (P[end] - P[start])
        return power[end - 1] * (prefix[end] - prefix[start])


def _duplicate_chars_of_strings(words: Sequence[str], n: int) -> int:
    seen: set[str] = set()
    repeated = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def top_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram (its length times its count)."""
    return _Grams(words).top_chars(n)


def duplicate_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier one, skipping past each repeat."""
    return _Grams(words).duplicate_chars([n])[n]


def gopher_repetition_rule(text: str, spec: GopherRepetitionSpec) -> str | None:
    """The first Gopher repetition rule ``text`` fails, or None.

    Args:
        text: the document text.
        spec: thresholds (``None`` skips a rule).
    """
    if not text:
        return "empty"
    paragraphs = PARAGRAPH_RE.split(text.strip())
    n_dup, chars = find_duplicates(paragraphs)
    if spec.dup_para_frac and n_dup / len(paragraphs) > spec.dup_para_frac:
        return "dup_para_frac"
    if spec.dup_para_char_frac and chars / len(text) > spec.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = LINE_RE.split(text)
    n_dup, chars = find_duplicates(lines)
    if spec.dup_line_frac and n_dup / len(lines) > spec.dup_line_frac:
        return "dup_line_frac"
    if spec.dup_line_char_frac and chars / len(text) > spec.dup_line_char_frac:
        return "dup_line_char_frac"
    if not spec.top_n_grams and not spec.dup_n_grams:
        return None
    grams = _Grams(split_words(text))
    for n, frac in spec.top_n_grams:
        if grams.top_chars(n) / len(text) > frac:
            return f"top_{n}_gram"
    duplicated = grams.duplicate_chars([n for n, _ in spec.dup_n_grams])
    for n, frac in spec.dup_n_grams:
        if duplicated[n] / len(text) > frac:
            return f"duplicated_{n}_n_grams"
    return None


class GopherRepetition(Step):
    """Drops documents failing a Gopher repetition rule."""

    name = "gopher_repetition"

    def __init__(self, spec: GopherRepetitionSpec) -> None:
        super().__init__()
        self.spec = spec

    def process(self, doc: Document) -> Document | str:
        """Keep or name the rule that fired."""
        return gopher_repetition_rule(doc.text, self.spec) or doc
