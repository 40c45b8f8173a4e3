"""Unicode normalisation and whitespace clean-up (the first transform after reading)."""

from __future__ import annotations

import re
import unicodedata

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import NormalizeSpec

CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
SPACES_RE = re.compile(r"[^\S\n]+")
TRAILING_RE = re.compile(r" *\n *")
BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize_text(text: str, form: str = "NFC") -> str:
    """NFC (or NFKC), one newline style, no control characters, single spaces, <= 1 blank line.

    Args:
        text: raw text.
        form: Unicode normal form.
    """
    text = unicodedata.normalize(form, text)  # type: ignore[arg-type]  # validated by the spec
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_RE.sub("", text)
    text = SPACES_RE.sub(" ", text)
    text = TRAILING_RE.sub("\n", text)
    text = BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


class Normalize(Step):
    """Normalises text; drops documents left empty.

    Counters: ``control_chars`` (control and invisible characters removed, NULs included),
    ``nul_chars`` (the NULs among them) and ``chars_removed`` (code points fewer after
    normalising, whitespace and Unicode composition included), over every document.
    """

    name = "normalize"

    def __init__(self, spec: NormalizeSpec) -> None:
        super().__init__()
        self.form = spec.form

    def process(self, doc: Document) -> Document | str:
        """Normalise (counting what is removed), or drop as ``empty``."""
        c = self.stats.counters
        nul = doc.text.count("\x00")
        if nul:
            c["nul_chars"] += nul
        control = len(CONTROL_RE.findall(doc.text))
        if control:
            c["control_chars"] += control
        text = normalize_text(doc.text, self.form)
        if len(text) != len(doc.text):
            c["chars_removed"] += len(doc.text) - len(text)
        if not text:
            return "empty"
        if text != doc.text:
            doc.text = text
        return doc
