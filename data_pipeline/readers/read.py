"""The reader step: input files (any supported format) to documents, with its statistics."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from crucible.cluster.storage import location
from crucible.data_pipeline.document import Document, Exclusion, InputFile, make_key
from crucible.data_pipeline.document_step import PipelineStep
from crucible.data_pipeline.readers.files import input_format
from crucible.data_pipeline.readers.jsonl import read_jsonl
from crucible.data_pipeline.readers.parquet import read_parquet
from crucible.data_pipeline.readers.warc import read_warc
from crucible.data_pipeline.spec import ReaderSpec


class Reader(PipelineStep):
    """Reads input files into documents, counting what it reads and loses."""

    name = "read"

    def __init__(self, spec: ReaderSpec) -> None:
        super().__init__()
        self.spec = spec
        self._lost: dict[str, int] = {}

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
            st.dropped["empty_file"] += 1
            self.exclusions.append(Exclusion(f"{path}#0", path, "read/empty_file"))
            return
        fmt = input_format(path)
        if fmt == "jsonl":
            docs = read_jsonl(path, self.spec, st, self.exclusions)
        elif fmt == "parquet":
            docs = read_parquet(path, self.spec, st, self.exclusions)
        else:
            docs = read_warc(path, self.spec, st, self.exclusions, wet=fmt == "wet")
        for row, doc in enumerate(docs):
            doc.key = make_key(part, row)
            st.docs_out += 1
            st.bytes_out += doc.nbytes
            yield doc
        for lost in ("truncated_file", "corrupt_compressed_file"):
            if st.counters.get(lost, 0) > self._lost.get(lost, 0):
                # the unreadable tail of a file: one record for audit (documents unknown)
                self._lost[lost] = st.counters[lost]
                st.dropped[lost] += 1
                self.exclusions.append(Exclusion(f"{path}#{lost}", path, f"read/{lost}"))
        st.docs_in = st.docs_out + sum(st.dropped.values())
