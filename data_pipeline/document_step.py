"""The step contract: ``run(items) -> documents``, statistics and exclusions counted by the step.

A reader is a step whose items are input files; every other step takes and gives documents,
so a part's work is one chain (``reader, *filters``) applied in turn. A step never knows which
executor runs it: the executor runs the stage, the stage chains the steps over one part.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from crucible.data_pipeline.document import Document, Exclusion


class StepStats:
    """Counts of one step: documents and bytes in and out, drops per rule, other counters."""

    def __init__(self) -> None:
        self.docs_in = 0
        self.docs_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())),
        }


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two ``{step: StepStats.to_dict()}`` mappings (nested counters included)."""
    out: dict[str, Any] = {k: _copy(v) for k, v in a.items()}
    for step, sb in b.items():
        sa = out.setdefault(step, {})
        for field, value in sb.items():
            if isinstance(value, dict):
                dst = sa.setdefault(field, {})
                for k, n in value.items():
                    dst[k] = dst.get(k, 0) + n
                sa[field] = dict(sorted(dst.items()))
            else:
                sa[field] = sa.get(field, 0) + value
    return out


def _copy(v: Any) -> Any:
    return {k: _copy(x) for k, x in v.items()} if isinstance(v, dict) else v


class PipelineStep(abc.ABC):
    """A step: :meth:`run` turns a stream of items into documents, counting into
    :attr:`stats` and recording every drop in :attr:`exclusions` (drained by the stage)."""

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats()
        self.exclusions: list[Exclusion] = []

    @abc.abstractmethod
    def run(self, data: Iterable[Any]) -> Iterator[Document]:
        """The documents of ``data`` (input files for a reader, documents for the rest)."""


class Step(PipelineStep):
    """A document step: subclasses implement :meth:`process`; :meth:`run` does the counting.

    ``process`` returns the (possibly modified) document to keep it, or the name of the rule
    that fired to drop it.
    """

    @abc.abstractmethod
    def process(self, doc: Document) -> Document | str:
        """Keep (return the document) or drop (return the rule name)."""

    def drop(self, doc: Document, rule: str) -> None:
        """Record ``doc`` as dropped by ``rule``."""
        self.stats.dropped[rule] += 1
        self.exclusions.append(Exclusion(doc.id, doc.source, f"{self.name}/{rule}", doc.text))

    def run(self, data: Iterable[Document]) -> Iterator[Document]:
        """Apply the step to a stream of documents, counting as it goes."""
        st = self.stats
        for doc in data:
            st.docs_in += 1
            st.bytes_in += doc.nbytes
            text = doc.text
            out = self.process(doc)
            if isinstance(out, str):
                self.drop(doc, out)
                continue
            if out.text is not text:
                out.nbytes = len(out.text.encode("utf-8", "surrogatepass"))
            st.docs_out += 1
            st.bytes_out += out.nbytes
            yield out
