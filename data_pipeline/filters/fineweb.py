"""FineWeb quality rules (Penedo et al. 2024), as datatrove's FineWebQualityFilter defines them."""

from __future__ import annotations

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.filters.gopher_repetition import find_duplicates
from crucible.data_pipeline.spec import FineWebSpec
from crucible.data_pipeline.text import split_words, terminal_punctuation


def fineweb_rule(text: str, spec: FineWebSpec) -> str | None:
    """The first FineWeb rule ``text`` fails, or None.

    Args:
        text: the document text.
        spec: thresholds (``None`` skips a rule).
    """
    lines = [line for line in text.split("\n") if line.strip() != ""]
    if not lines:
        return "empty"
    if spec.line_punct_thr is not None:
        stops = terminal_punctuation()
        ratio = sum(line.endswith(stops) for line in lines) / len(lines)
        if ratio < spec.line_punct_thr and not (ratio == 0 and spec.line_punct_exclude_zero):
            return "line_punct_ratio"
    if spec.short_line_thr is not None:
        ratio = sum(len(line) <= spec.short_line_length for line in lines) / len(lines)
        if ratio > spec.short_line_thr:
            return "short_line_ratio"
    if spec.char_duplicates_ratio is not None:
        chars = len(text.replace("\n", ""))
        if chars and find_duplicates(lines)[1] / chars > spec.char_duplicates_ratio:
            return "char_dup_ratio"
    if spec.new_line_ratio is not None:
        words = split_words(text)
        if not words or text.count("\n") / len(words) > spec.new_line_ratio:
            return "list_ratio"
    return None


class FineWeb(Step):
    """Drops documents failing a FineWeb quality rule."""

    name = "fineweb"

    def __init__(self, spec: FineWebSpec) -> None:
        super().__init__()
        self.spec = spec

    def process(self, doc: Document) -> Document | str:
        """Keep or name the rule that fired."""
        return fineweb_rule(doc.text, self.spec) or doc
