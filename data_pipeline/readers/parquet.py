"""Parquet reader: streams record batches, so a large file never sits in memory whole."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import location
from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.spec import ReaderSpec


def read_parquet(
    path: str, spec: ReaderSpec, stats: StepStats, exclusions: list[Exclusion]
) -> Iterator[Document]:
    """Documents of a Parquet file (text, optional id and url columns).

    Args:
        path: the file.
        spec: column names and size limit.
        stats: the reader's counters.
        exclusions: where unreadable rows or files are recorded.
    """

    def bad(row: int, rule: str) -> None:
        stats.dropped[rule] += 1
        exclusions.append(Exclusion(f"{path}#{row}", path, f"read/{rule}"))

    try:
        pf = pq.ParquetFile(location(path).open_read())
    except (pa.ArrowInvalid, OSError):
        bad(0, "bad_parquet")
        return
    names = set(pf.schema_arrow.names)
    if spec.text_key not in names:
        bad(0, "missing_text")
        return
    cols = [c for c in (spec.text_key, spec.id_key, spec.url_key) if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=spec.batch_size, columns=cols):
            d = batch.to_pydict()
            ids = d.get(spec.id_key) or [None] * batch.num_rows
            urls = d.get(spec.url_key) or [None] * batch.num_rows
            for text, raw_id, url in zip(d[spec.text_key], ids, urls, strict=True):
                if not isinstance(text, str):
                    bad(row, "missing_text" if text is None else "text_not_string")
                elif (n := len(text.encode("utf-8", "surrogatepass"))) > spec.max_doc_bytes:
                    bad(row, "too_large")
                else:
                    yield Document(
                        id=str(raw_id) if raw_id not in (None, "") else f"{path}#{row}",
                        text=text,
                        source=path,
                        url=url if isinstance(url, str) else None,
                        nbytes=n,
                    )
                row += 1
    except (pa.ArrowInvalid, OSError):
        stats.counters["truncated_file"] += 1
