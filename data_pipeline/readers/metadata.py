"""The input fields a document carries besides its text (JSONL/Parquet fields, WARC and HTTP
headers): which are kept (``reader.metadata``) and the JSON kind of each value, counted by the
reader as ``metadata/<field>/<kind>`` so the writer can give every field one column type
across all parts (:mod:`crucible.data_pipeline.writers.metadata`)."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.spec import ReaderSpec

INT64 = 1 << 63
COUNTER_PREFIX = "metadata/"


def plain(value: Any) -> Any:
    """``value`` as a JSON value (dates as ISO 8601 strings, bytes as base64)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def kind(value: Any) -> str:
    """The JSON kind of a non-null value: ``bool``, ``int`` (int64 range), ``float``,
    ``string`` or ``json`` (objects, arrays, larger integers)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -INT64 <= value < INT64 else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "json"


def select_metadata(
    fields: Iterable[tuple[str, Any]], spec: ReaderSpec, skip: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """The kept, non-null fields of a record as JSON values, or None when none is kept.

    Args:
        fields: ``(name, value)`` pairs of the record.
        spec: ``spec.metadata`` says which names are kept (``all``, ``none`` or a list).
        skip: names already carried as document columns (text, id, url).
    """
    if spec.metadata == "none":
        return None
    wanted = None if spec.metadata == "all" else set(spec.metadata)
    out = {
        name: plain(value)
        for name, value in fields
        if value is not None and name not in skip and (wanted is None or name in wanted)
    }
    return out or None


def count_kinds(metadata: dict[str, Any] | None, stats: StepStats) -> None:
    """Count each field's kind as ``metadata/<field>/<kind>``."""
    if metadata:
        for name, value in metadata.items():
            stats.counters[f"{COUNTER_PREFIX}{name}/{kind(value)}"] += 1
