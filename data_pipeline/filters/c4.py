"""C4 rules (Raffel et al. 2020 and tfds c4_utils), as datatrove's C4QualityFilter applies them.

Line rules remove lines (the document text is rewritten); page rules drop the document.
"""

from __future__ import annotations

import re

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import C4Spec
from crucible.data_pipeline.text import split_sentences

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def c4_filter(text: str, spec: C4Spec, counts: dict[str, int]) -> str | tuple[str]:
    """The kept text, or ``(rule,)`` when a page rule drops the document.

    Args:
        text: the document text.
        spec: which rules apply.
        counts: line-level counters, updated in place (``line_filter_*``, ``lines_kept``).
    """
    kept: list[str] = []
    sentences = 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if spec.max_word_length and any(len(w) > spec.max_word_length for w in words):
            counts["line_filter_too_long_word"] = counts.get("line_filter_too_long_word", 0) + 1
            continue
        if spec.remove_citations:
            line = CITATION_RE.sub("", line)
        if spec.filter_no_terminal_punct and (
            not line.endswith(END_PUNCTUATION) or line.endswith("...")
        ):
            counts["line_filter_no_terminal_punct"] = (
                counts.get("line_filter_no_terminal_punct", 0) + 1
            )
            continue
        if spec.min_words_per_line and len(words) < spec.min_words_per_line:
            counts["line_filter_too_few_words"] = counts.get("line_filter_too_few_words", 0) + 1
            continue
        low = line.lower()
        if spec.filter_lorem_ipsum and "lorem ipsum" in low:
            return ("lorem_ipsum",)
        if spec.filter_javascript and "javascript" in low:
            counts["line_filter_javascript"] = counts.get("line_filter_javascript", 0) + 1
            continue
        if spec.filter_curly_bracket and "{" in line:
            return ("curly_bracket",)
        if spec.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
            counts["line_filter_policy"] = counts.get("line_filter_policy", 0) + 1
            continue
        if spec.min_num_sentences:
            sentences += len(split_sentences(line))
        kept.append(line)
    counts["lines_kept"] = counts.get("lines_kept", 0) + len(kept)
    if spec.min_num_sentences and sentences < spec.min_num_sentences:
        return ("too_few_sentences",)
    return "\n".join(kept).strip()


class C4(Step):
    """Removes C4's bad lines; drops pages with lorem ipsum, curly braces or too few sentences."""

    name = "c4"

    def __init__(self, spec: C4Spec) -> None:
        super().__init__()
        self.spec = spec
        self._counts: dict[str, int] = {}

    def process(self, doc: Document) -> Document | str:
        """Rewrite the text or name the page rule that fired."""
        out = c4_filter(doc.text, self.spec, self._counts)
        self.stats.counters.update(self._counts)
        self._counts.clear()
        if isinstance(out, tuple):
            return out[0]
        if out != doc.text:
            doc.text = out
        return doc
