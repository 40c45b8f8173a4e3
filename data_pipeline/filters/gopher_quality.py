"""Gopher quality rules (Rae et al. 2021, appendix A), as datatrove defines them."""

from __future__ import annotations

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import GopherQualitySpec
from crucible.data_pipeline.text import punctuation_set, split_words


def gopher_quality_rule(text: str, spec: GopherQualitySpec) -> str | None:
    """The first Gopher quality rule ``text`` fails, or None if it passes.

    Args:
        text: the document text.
        spec: thresholds (``None`` skips a rule).
    """
    punct = punctuation_set()
    words = split_words(text)
    n_words = len(words)
    non_symbol = [w for w in words if not punct.issuperset(w)]
    n = len(non_symbol)
    if spec.min_doc_words and n < spec.min_doc_words:
        return "short_doc"
    if spec.max_doc_words and n > spec.max_doc_words:
        return "long_doc"
    if n_words == 0 or n == 0:
        return "short_doc"
    avg = sum(len(w) for w in non_symbol) / n
    if spec.min_avg_word_length and avg < spec.min_avg_word_length:
        return "below_avg_word_length"
    if spec.max_avg_word_length and avg > spec.max_avg_word_length:
        return "above_avg_word_length"
    if spec.max_symbol_word_ratio:
        if text.count("#") / n_words > spec.max_symbol_word_ratio:
            return "too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > spec.max_symbol_word_ratio:
            return "too_many_ellipsis"
    lines = text.splitlines() or [""]
    if spec.max_bullet_lines_ratio:
        bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
        if bullets / len(lines) > spec.max_bullet_lines_ratio:
            return "too_many_bullets"
    if spec.max_ellipsis_lines_ratio:
        ends = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if ends / len(lines) > spec.max_ellipsis_lines_ratio:
            return "too_many_end_ellipsis"
    if spec.max_non_alpha_words_ratio:
        alpha = sum(w.isalpha() or any(c.isalpha() for c in w) for w in words)
        if alpha / n_words < spec.max_non_alpha_words_ratio:
            return "below_alpha_threshold"
    if spec.min_stop_words:
        stop = set(spec.stop_words)
        if len(stop.intersection(words)) < spec.min_stop_words:
            return "not_enough_stop_words"
    return None


class GopherQuality(Step):
    """Drops documents failing a Gopher quality rule."""

    name = "gopher_quality"

    def __init__(self, spec: GopherQualitySpec) -> None:
        super().__init__()
        self.spec = spec

    def process(self, doc: Document) -> Document | str:
        """Keep or name the rule that fired."""
        return gopher_quality_rule(doc.text, self.spec) or doc
