"""JSONL reader (plain, .gz, .zst): one bad line costs one document, never the rest of the file."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from crucible.data_pipeline.chat import (
    TEMPLATES,
    BadRecord,
    record_comparison,
    record_turns,
    render,
    render_comparison,
)
from crucible.data_pipeline.document import Document, Exclusion
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.readers.files import iter_lines
from crucible.data_pipeline.readers.metadata import select_metadata
from crucible.data_pipeline.spec import ReaderSpec


def _parse(line: bytes, stats: StepStats) -> object:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    # orjson rejects invalid UTF-8 outright: decode that one line with replacement characters
    # (counted), so a bad byte costs at most some characters, not the line or the file.
    try:
        line.decode("utf-8")
        return None
    except UnicodeDecodeError:
        stats.counters["invalid_utf8_lines"] += 1
    try:
        return orjson.loads(line.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return None


def read_jsonl(
    path: str,
    spec: ReaderSpec,
    stats: StepStats,
    exclusions: list[Exclusion],
    compression: str | None = None,
) -> Iterator[Document]:
    """Documents of a JSONL file; bad lines are recorded in ``stats`` and ``exclusions``.

    A last line without its newline that does not parse, or any such line of a truncated
    file, is a cut record (``truncated_record``), never a document.

    Args:
        path: the file.
        spec: field names, size limit and the metadata to keep.
        stats: the reader's counters.
        exclusions: where unreadable lines are recorded.
        compression: ``gzip``, ``zstd`` or None, as detected from the content.
    """

    def bad(offset: int, rule: str, text: str | None = None) -> None:
        stats.dropped[rule] += 1
        exclusions.append(Exclusion(f"{path}#{offset}", path, f"read/{rule}", text))

    columns: tuple[str, ...] = (spec.text_key, spec.id_key, spec.url_key)
    if spec.chat is not None:  # the conversation is the text, not metadata
        c = spec.chat
        columns += (c.messages_key, c.prompt_key, c.response_key, c.system_key)
        if c.comparisons:
            columns += (c.answers_key, c.chosen_key, c.rejected_key)
    cut_files = stats.counters["files/truncated"]  # more after the last chunk: this file is cut
    for offset, line, ended in iter_lines(path, stats, compression):
        stats.counters["lines"] += 1
        if not line.strip():
            stats.counters["blank_lines"] += 1
            continue
        if len(line) > spec.max_doc_bytes:
            bad(offset, "too_large")
            continue
        obj = _parse(line, stats)
        if not ended and (
            not isinstance(obj, dict) or stats.counters["files/truncated"] > cut_files
        ):
            bad(offset, "truncated_record", line[:1000].decode("utf-8", "replace"))
            continue
        if not isinstance(obj, dict):
            bad(offset, "bad_json", line[:1000].decode("utf-8", "replace"))
            continue
        text: object
        if spec.chat is not None:
            try:
                template = TEMPLATES[spec.chat.template]
                if spec.chat.comparisons:
                    text = render_comparison(*record_comparison(obj, spec.chat), template)
                else:
                    text = render(record_turns(obj, spec.chat), template)
            except BadRecord as e:
                bad(offset, e.rule, f"{e}: {line[:1000].decode('utf-8', 'replace')}")
                continue
            if len(text.encode("utf-8", "surrogatepass")) > spec.max_doc_bytes:
                bad(offset, "too_large")
                continue
        else:
            text = obj.get(spec.text_key)
        if text is None:
            bad(offset, "missing_text")
            continue
        if not isinstance(text, str):
            bad(offset, "text_not_string")
            continue
        raw_id = obj.get(spec.id_key)
        doc_id = str(raw_id) if isinstance(raw_id, (str, int)) and raw_id != "" else None
        url = obj.get(spec.url_key)
        yield Document(
            id=doc_id or f"{path}#{offset}",
            text=text,
            source=path,
            url=url if isinstance(url, str) else None,
            nbytes=len(text.encode("utf-8", "surrogatepass")),
            metadata=select_metadata(obj.items(), spec, columns),
        )
