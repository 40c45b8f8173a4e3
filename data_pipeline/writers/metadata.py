"""Document metadata as Parquet: one JSON text per document in the intermediate (filtered)
files, and a typed ``metadata`` struct column in the clean documents.

Why a struct of typed fields and how it stays consistent: each input part is written on its
own, so a column type chosen per part could disagree across parts (an ``int`` field in one
file, a ``string`` in another) and break reading the documents as one dataset. The reader
counts every field's JSON kind (``metadata/<field>/<kind>`` in its statistics); before the
clean documents are written, the kinds of all parts are unified into one type per field
(:func:`unify_kinds`), and every part is written with that same struct type. A field whose
kinds disagree (or that holds objects or arrays) becomes a string of JSON, marked with the
field metadata ``encoding: json``. The struct keeps input names apart from the document's own
columns (an input field called ``language`` does not collide with the detected language).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import pyarrow as pa

from crucible.data_pipeline.readers.metadata import COUNTER_PREFIX, kind

ARROW_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),
}
JSON_FIELD = {b"encoding": b"json"}


def to_json(metadata: dict[str, Any] | None) -> str | None:
    """``metadata`` as a JSON object text (None stays None)."""
    if not metadata:
        return None
    return orjson.dumps(metadata, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def kinds_from_counters(counters: Mapping[str, int]) -> dict[str, set[str]]:
    """``{field: {kinds}}`` from a reader's ``metadata/<field>/<kind>`` counters."""
    out: dict[str, set[str]] = {}
    for key, n in counters.items():
        if key.startswith(COUNTER_PREFIX) and n:
            name, _, k = key[len(COUNTER_PREFIX) :].rpartition("/")
            out.setdefault(name, set()).add(k)
    return out


def unify_kinds(kinds: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """One kind per field, sorted by name: ints and floats together are ``float``; any other
    mix (or objects and arrays) is ``json``."""
    out = {}
    for name in sorted(kinds):
        ks = set(kinds[name])
        if len(ks) == 1:
            out[name] = ks.pop()
        elif ks == {"int", "float"}:
            out[name] = "float"
        else:
            out[name] = "json"
    return out


def metadata_type(fields: Mapping[str, str]) -> pa.StructType | None:
    """The struct type of ``{field: kind}`` (None when there is no field: Parquet has no
    empty struct)."""
    if not fields:
        return None
    return pa.struct(
        [
            pa.field(name, ARROW_TYPES[k], metadata=JSON_FIELD if k == "json" else None)
            for name, k in fields.items()
        ]
    )


def _cell(value: Any, k: str) -> Any:
    if value is None:
        return None
    if k == "json":
        return orjson.dumps(value, default=str).decode()
    vk = kind(value)
    if vk == k or (k == "float" and vk == "int"):
        return value
    return None  # not a kind the unified type admits (only when counts were lost)


def metadata_column(texts: Iterable[str | None], fields: Mapping[str, str]) -> pa.StructArray:
    """The ``metadata`` struct column of documents whose metadata JSON texts are ``texts``.

    Args:
        texts: one JSON object text (or None) per document, as :func:`to_json` wrote it.
        fields: ``{field: kind}`` of every part (:func:`unify_kinds`); fields not in it are
            left out.
    """
    rows = [orjson.loads(t) if t else None for t in texts]
    struct = metadata_type(fields)
    assert struct is not None
    children = [
        pa.array(
            [_cell(r.get(name) if r else None, k) for r in rows],
            ARROW_TYPES[k],
        )
        for name, k in fields.items()
    ]
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.StructArray.from_arrays(children, fields=list(struct), mask=mask)
