"""Text helpers shared by the filters: word and sentence splitting, punctuation sets.

Words are split with a regex (word runs, and runs of other non-space characters) rather than
datatrove's spaCy tokenizer: the counts the rules use agree on ordinary prose and the regex is
an order of magnitude faster.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

import numpy as np
import regex

WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
SENTENCE_END_RE = re.compile(r"(?<=[.!?。！？])[\"'”’)\]]*\s+")


@functools.lru_cache(maxsize=1)
def split_words(text: str) -> tuple[str, ...]:
    """Words and punctuation runs of ``text`` (the last text's are kept: the quality rules ask
    for the same document's words in turn)."""
    return tuple(WORD_RE.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after terminal punctuation followed by space)."""
    return [s for s in SENTENCE_END_RE.split(text) if s.strip()]


@functools.cache
def terminal_punctuation() -> tuple[str, ...]:
    """Unicode Sentence_Terminal characters (the set datatrove's TERMINAL_PUNCTUATION lists)."""
    codes = np.arange(sys.maxunicode + 1, dtype="<u4")
    every = codes[(codes < 0xD800) | (codes >= 0xE000)].tobytes().decode("utf-32-le")
    return tuple(sorted(set(regex.findall(r"\p{Sentence_Terminal}", every))))


@functools.cache
def punctuation_set() -> frozenset[str]:
    """Characters that count as symbols for Gopher's "non-symbol word" (Unicode P* and S*)."""
    chars = set(terminal_punctuation())
    for c in range(0x3000):
        ch = chr(c)
        cat = unicodedata.category(ch)
        if cat[0] in "PS" or cat == "Cc":
            chars.add(ch)
    return frozenset(chars)
