"""The units that flow between steps: an input file, a document, and the record of a dropped
document."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A document's dedup key packs (input part index, position in part): the smallest key in a
# duplicate cluster is the document read first, which makes the survivor deterministic.
ROW_BITS = 32


def make_key(part: int, row: int) -> int:
    """The int64 dedup key of the ``row``-th document read from input part ``part``."""
    return (part << ROW_BITS) | row


@dataclass(frozen=True, slots=True)
class InputFile:
    """An input file, the reader step's item: its path and its part (index in the sorted
    list of inputs)."""

    part: int
    path: str


@dataclass(slots=True)
class Document:
    """One document: a stable id, its text, where it came from, and the input's other fields
    (``metadata``: JSON values by name, None when there are none)."""

    id: str
    text: str
    source: str
    url: str | None = None
    language: str | None = None
    language_score: float | None = None
    key: int = 0
    nbytes: int = 0
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class Exclusion:
    """A dropped document (or unreadable input): which rule fired, for audit."""

    id: str
    source: str
    rule: str
    text: str | None = None
