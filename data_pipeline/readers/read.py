"""The reader step: input files (any supported format) to documents, with its statistics.

Documents lost inside a file are counted per rule in ``dropped`` and named in exclusions;
failures of a whole file (empty, corrupt, truncated) are counted apart, as ``files/<kind>``
counters, and named in a logged warning (:mod:`.file_errors`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from crucible.cluster.storage import location
from crucible.data_pipeline.document import Document, InputFile, make_key
from crucible.data_pipeline.document_step import PipelineStep
from crucible.data_pipeline.readers.file_errors import file_failed
from crucible.data_pipeline.readers.formats import detect_format
from crucible.data_pipeline.readers.jsonl import read_jsonl
from crucible.data_pipeline.readers.metadata import count_kinds
from crucible.data_pipeline.readers.parquet import read_parquet
from crucible.data_pipeline.readers.warc import read_warc
from crucible.data_pipeline.spec import ReaderSpec


class Reader(PipelineStep):
    """Reads input files into documents, counting what it reads and loses."""

    name = "read"

    def __init__(self, spec: ReaderSpec) -> None:
        super().__init__()
        self.spec = spec

    def run(self, data: Iterable[InputFile]) -> Iterator[Document]:
        """Documents of each input file; each gets the dedup key ``(part, position)``.

        Args:
            data: the input files, each with its index in the sorted list of inputs.
        """
        for f in data:
            yield from self._read(f.path, f.part)

    def _read(self, path: str, part: int) -> Iterator[Document]:
        st = self.stats
        st.counters["files"] += 1
        size = location(path).size()
        st.bytes_in += size
        if size == 0:
            file_failed(st, path, "empty", "empty file, no documents")
            return
        fmt = detect_format(path, st)
        if self.spec.chat is not None and fmt.kind != "jsonl":
            file_failed(
                st, path, "not_chat", f"a {fmt.kind} file; chat records are read from JSONL"
            )
            return
        if fmt.kind == "parquet":
            docs = read_parquet(path, self.spec, st, self.exclusions)
        elif fmt.kind == "jsonl":
            docs = read_jsonl(path, self.spec, st, self.exclusions, fmt.compression)
        else:
            wet = fmt.kind == "wet"
            docs = read_warc(path, self.spec, st, self.exclusions, wet, fmt.compression)
        for row, doc in enumerate(docs):
            doc.key = make_key(part, row)
            st.docs_out += 1
            st.bytes_out += doc.nbytes
            count_kinds(doc.metadata, st)
            yield doc
        st.docs_in = st.docs_out + sum(st.dropped.values())
