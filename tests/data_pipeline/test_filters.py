"""Each filter on small hand-made cases at its thresholds (datatrove's definitions)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.filters import gopher_repetition
from crucible.data_pipeline.filters.c4 import C4, c4_filter
from crucible.data_pipeline.filters.fineweb import fineweb_rule
from crucible.data_pipeline.filters.gopher_quality import gopher_quality_rule
from crucible.data_pipeline.filters.gopher_repetition import (
    duplicate_ngram_chars,
    gopher_repetition_rule,
    top_ngram_chars,
)
from crucible.data_pipeline.normalize import normalize_text
from crucible.data_pipeline.spec import (
    C4Spec,
    FineWebSpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
)

GQ = GopherQualitySpec()


def words(n: int, w: str = "word") -> str:
    return " ".join([w] * n)


def prose(n: int) -> str:
    base = [
        "the",
        "cat",
        "and",
        "the",
        "dog",
        "went",
        "to",
        "the",
        "river",
        "with",
        "their",
        "friends",
    ]
    return " ".join(base[i % len(base)] for i in range(n))


def test_gopher_word_count_bounds() -> None:
    assert gopher_quality_rule(prose(49), GQ) == "short_doc"
    assert gopher_quality_rule(prose(50), GQ) is None
    assert gopher_quality_rule(prose(100_001), GQ) == "long_doc"
    # punctuation-only tokens do not count as words
    assert gopher_quality_rule(prose(49) + " ... !!", GQ) == "short_doc"


def test_gopher_mean_word_length() -> None:
    assert gopher_quality_rule("the and " + words(60, "ab"), GQ) == "below_avg_word_length"
    assert gopher_quality_rule("the and " + words(60, "abcdefghijk"), GQ) == "above_avg_word_length"


def test_gopher_symbol_ratio() -> None:
    text = prose(100)
    assert gopher_quality_rule(text + " #" * 12, GQ) == "too_many_hashes"  # 12/112 > 0.1
    assert gopher_quality_rule(text + " #" * 10, GQ) is None  # 10/110 = 0.09
    assert gopher_quality_rule(text + " ..." * 12, GQ) == "too_many_ellipsis"


def test_gopher_bullets_and_ellipsis_lines() -> None:
    bullets = "\n".join(f"- {prose(10)}" for _ in range(10))
    assert gopher_quality_rule(bullets, GQ) == "too_many_bullets"
    ok = bullets + "\n" + prose(10) + "\n" + prose(10)  # 10/12 <= 0.9
    assert gopher_quality_rule(ok, GQ) is None
    ell = "\n".join(prose(10) + ("..." if i < 4 else ".") for i in range(10))
    assert gopher_quality_rule(ell, GQ) == "too_many_end_ellipsis"  # 4/10 > 0.3


def test_gopher_alpha_and_stop_words() -> None:
    nums = prose(60) + " " + " ".join(["123"] * 20)  # 60/80 = 0.75 < 0.8
    assert gopher_quality_rule(nums, GQ) == "below_alpha_threshold"
    no_stop = " ".join(["apple", "banana", "cherry", "melon"] * 20)
    assert gopher_quality_rule(no_stop, GQ) == "not_enough_stop_words"
    assert gopher_quality_rule(no_stop + " the and", GQ) is None
    assert gopher_quality_rule(no_stop, GopherQualitySpec(min_stop_words=None)) is None


def test_gopher_repetition_lines_and_paragraphs() -> None:
    spec = GopherRepetitionSpec(top_n_grams=[], dup_n_grams=[])
    uniq = [f"line number {w} is here" for w in "abcdefghij"]
    assert gopher_repetition_rule("\n".join(uniq), spec) is None
    dup_lines = "\n".join(uniq[:6] + [uniq[0]] * 4)  # 4/10 > 0.3
    assert gopher_repetition_rule(dup_lines, spec) == "dup_line_frac"
    paras = "\n\n".join(uniq[:6] + [uniq[0]] * 4)
    assert gopher_repetition_rule(paras, spec) == "dup_para_frac"


def test_gopher_repetition_ngrams() -> None:
    w = ["a", "b", "a", "b", "a", "b", "c", "d"]
    assert top_ngram_chars(w, 2) == len("a b") * 3
    # "xy" repeats at position 3 (2 chars), then the scan skips past it: "zq" is new
    assert duplicate_ngram_chars(["x", "y", "z", "x", "y", "z", "q"], 2) == 2
    spec = GopherRepetitionSpec(dup_line_frac=None, dup_para_frac=None)
    spam = " ".join(["buy cheap"] * 30) + " " + prose(60)
    assert gopher_repetition_rule(spam, spec) == "top_2_gram"
    assert gopher_repetition_rule(prose(200), GopherRepetitionSpec(top_n_grams=[])) is not None


def datatrove_top_ngram_chars(words: list[str], n: int) -> int:
    """datatrove's ``find_top_duplicate``: n-grams joined with spaces, counted."""
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def datatrove_duplicate_ngram_chars(words: list[str], n: int) -> int:
    """datatrove's ``find_all_duplicate``: n-grams joined with no separator."""
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


def random_words(rng: random.Random) -> list[str]:
    # few, overlapping tokens: many repeats, and different word runs that join to one string
    # ("a bc" and "ab c"), which datatrove's duplicate rule counts as equal
    alphabet = ["a", "b", "ab", "ba", "c", "bc", "abc", "é"]
    return [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]


def test_ngram_rules_count_as_datatrove_does() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        w = random_words(rng)
        for n in range(1, 8):
            assert top_ngram_chars(w, n) == datatrove_top_ngram_chars(w, n), (w, n)
            assert duplicate_ngram_chars(w, n) == datatrove_duplicate_ngram_chars(w, n), (w, n)
    # joined with no separator, "a bc" repeats "ab c"
    assert duplicate_ngram_chars(["ab", "c", "x", "a", "bc"], 2) == 3


@pytest.mark.parametrize("collide", ["all", "across_n"])
def test_ngram_hash_collisions_fall_back_to_strings(
    collide: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal hashes of different strings (forced here) never count as a repeat."""

    def hashes(self: object, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        if collide == "all":
            return np.zeros(start.size, dtype=np.uint64)
        # an n-gram's length, unsalted: within one n equal strings still hash alike, and
        # once duplicate_chars salts each n, every n's hashes meet those of the others
        block = np.cumsum(np.diff(start, prepend=1) <= 0) - 1
        salt = block.astype(np.uint64) * np.uint64(gopher_repetition._BASE)
        return (end - start).astype(np.uint64) ^ salt

    monkeypatch.setattr(gopher_repetition._Grams, "_hashes", hashes)
    rng = random.Random(1)
    for _ in range(300):
        w = random_words(rng)
        got = gopher_repetition._Grams(w).duplicate_chars([5, 3, 2])
        assert got == {n: datatrove_duplicate_ngram_chars(w, n) for n in (5, 3, 2)}, w


def test_c4_line_rules_and_page_rules() -> None:
    spec = C4Spec()
    counts: dict[str, int] = {}
    good = [f"This is sentence number {i} of the page." for i in range(5)]
    text = "\n".join([*good, "no punctuation here", "Two words.", "Enable javascript please."])
    out = c4_filter(text, spec, counts)
    assert out == "\n".join(good)
    assert counts["line_filter_no_terminal_punct"] == 1
    assert counts["line_filter_too_few_words"] == 1
    assert counts["line_filter_javascript"] == 1
    assert c4_filter("\n".join(good[:4]), spec, {}) == ("too_few_sentences",)
    assert c4_filter("\n".join([*good, "Lorem ipsum dolor sit amet."]), spec, {}) == (
        "lorem_ipsum",
    )
    assert c4_filter("\n".join([*good, "A code {block} here."]), spec, {}) == ("curly_bracket",)
    assert c4_filter("\n".join([*good, "Read our privacy policy now."]), spec, {}) == "\n".join(
        good
    )
    assert c4_filter("Wiki text[1] ends here.", C4Spec(min_num_sentences=None), {}) == (
        "Wiki text ends here."
    )


def test_c4_step_rewrites_text_and_counts_bytes() -> None:
    step = C4(C4Spec(min_num_sentences=1))
    doc = Document("1", "Keep this line please.\nno", "s", nbytes=26)
    out = list(step.run([doc]))
    assert out[0].text == "Keep this line please."
    assert step.stats.bytes_out == len("Keep this line please.")


def test_fineweb_rules() -> None:
    spec = FineWebSpec()
    long_line = "this is a fairly long line of text that ends well."
    assert fineweb_rule(
        "\n".join([long_line] * 1 + [f"{long_line} {i}" for i in range(3)]), spec
    ) in (
        None,
        "char_dup_ratio",
    )
    no_punct = "\n".join(f"a line without a stop mark number {i}" for i in range(10))
    assert fineweb_rule(no_punct, spec) == "line_punct_ratio"
    short = "\n".join([f"Short {i}." for i in range(8)] + [long_line + f" {i}" for i in range(3)])
    assert fineweb_rule(short, spec) == "short_line_ratio"  # 8/11 > 0.67
    dup = "\n".join([long_line] * 3 + [long_line.replace("text", f"t{i}") for i in range(5)])
    assert fineweb_rule(dup, spec) == "char_dup_ratio"
    listy = "\n".join(f"Item number {i} is a thing in the list of things." for i in range(10))
    assert fineweb_rule(listy, spec) is None
    one_word_lines = "\n".join(f"Word{i}." for i in range(10))
    assert fineweb_rule(one_word_lines, FineWebSpec(short_line_thr=None)) == "list_ratio"


def test_normalize() -> None:
    assert normalize_text("Cafe\u0301  \t bar\r\n\r\n\r\n\nx\u200b ") == "Café bar\n\nx"
    assert normalize_text("\x00\x01") == ""
