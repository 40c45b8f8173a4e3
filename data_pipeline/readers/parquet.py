"""Parquet reader: streams record batches, so a large file never sits in memory whole."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from crucible.cluster.storage import location
from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.file_errors import file_failed
from crucible.data_pipeline.readers.metadata import select_metadata
from crucible.data_pipeline.spec import ReaderSpec


def read_parquet(
    path: str, spec: ReaderSpec, stats: StepStats, exclusions: list[Exclusion]
) -> Iterator[Document]:
    """Documents of a Parquet file (text, optional id and url columns, the other columns as
    metadata).

    An unreadable file is ``files/corrupt``; an unreadable row group keeps the rows before it.

    Args:
        path: the file.
        spec: column names, size limit and the metadata to keep.
        stats: the reader's counters.
        exclusions: where unreadable rows are recorded.
    """

    def bad(row: int, rule: str) -> None:
        stats.dropped[rule] += 1
        exclusions.append(Exclusion(f"{path}#{row}", path, f"read/{rule}"))

    try:
        pf = pq.ParquetFile(location(path).open_read())
    except (pa.ArrowInvalid, OSError) as e:
        file_failed(stats, path, "corrupt", f"not a readable Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if spec.text_key not in names:
        file_failed(
            stats, path, "missing_text_column", f"no column {spec.text_key!r} (reader.text_key)"
        )
        return
    keys = (spec.text_key, spec.id_key, spec.url_key)
    if spec.metadata == "none":
        cols = [c for c in keys if c in names]
    elif spec.metadata == "all":
        cols = names
    else:
        cols = [c for c in names if c in keys or c in spec.metadata]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=spec.batch_size, columns=cols):
            d = batch.to_pydict()
            for i, text in enumerate(d[spec.text_key]):
                if not isinstance(text, str):
                    bad(row, "missing_text" if text is None else "text_not_string")
                elif (n := len(text.encode("utf-8", "surrogatepass"))) > spec.max_doc_bytes:
                    bad(row, "too_large")
                else:
                    raw_id = d[spec.id_key][i] if spec.id_key in d else None
                    url = d[spec.url_key][i] if spec.url_key in d else None
                    fields = ((c, d[c][i]) for c in cols if c not in keys)
                    yield Document(
                        id=str(raw_id) if raw_id not in (None, "") else f"{path}#{row}",
                        text=text,
                        source=path,
                        url=url if isinstance(url, str) else None,
                        nbytes=n,
                        metadata=select_metadata(fields, spec),
                    )
                row += 1
    except (pa.ArrowInvalid, OSError) as e:
        file_failed(stats, path, "corrupt", f"unreadable after row {row} ({e}); rest skipped")
