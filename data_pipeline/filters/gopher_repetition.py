"""Gopher repetition rules (Rae et al. 2021, table A1), as datatrove defines them."""

from __future__ import annotations

import re
from collections import Counter

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import GopherRepetitionSpec
from crucible.data_pipeline.text import split_words

PARAGRAPH_RE = re.compile(r"\n{2,}")
LINE_RE = re.compile(r"\n+")


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


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram (its length times its count)."""
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier one, skipping past each repeat."""
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
    words = split_words(text)
    for n, frac in spec.top_n_grams:
        if top_ngram_chars(words, n) / len(text) > frac:
            return f"top_{n}_gram"
    for n, frac in spec.dup_n_grams:
        if duplicate_ngram_chars(words, n) / len(text) > frac:
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
