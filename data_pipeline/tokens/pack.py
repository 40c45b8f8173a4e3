"""Encode documents in batches and pack them, EOS-separated, into rows of ``seq_len + 1`` tokens.

A row holds the inputs and the shifted labels of one training sample. Documents run on from
one row into the next (long documents are split, never dropped); only the last row of a
packing stream is padded (with EOS, its ``length`` says how many tokens are real). Each row
keeps where documents start in it (``doc_starts``, so training can mask attention across
documents) and the ids of every document it holds tokens of (``doc_ids``, the lineage).
Pure functions over numpy and pyarrow: no Ray here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer


@dataclass
class PackStats:
    """Counters of one packing stream (added together across streams)."""

    documents: int = 0
    empty_documents: int = 0
    document_tokens: int = 0
    rows: int = 0
    padding_tokens: int = 0
    # chat shards only (:mod:`.pack_chat`)
    too_long: int = 0
    untrained: int = 0
    target_tokens: int = 0

    def add(self, other: PackStats) -> None:
        """Add ``other``'s counts into this one."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class EncodedBatch:
    """Token ids of a batch of non-empty documents, flat, with each document's length."""

    doc_ids: list[str]
    tokens: np.ndarray  # uint32, all documents concatenated, no EOS
    lengths: np.ndarray  # int64, one per document


def token_dtype(vocab_size: int, choice: str = "auto") -> pa.DataType:
    """uint16 when every id fits (vocab ≤ 65536), else uint32; ``choice`` forces one.

    Args:
        vocab_size: Number of token ids (ids are ``0..vocab_size-1``).
        choice: ``auto``, ``uint16`` or ``uint32``.
    """
    if choice == "uint32" or (choice == "auto" and vocab_size > 1 << 16):
        return pa.uint32()
    if vocab_size > 1 << 16:
        from crucible.errors import CrucibleError

        raise CrucibleError(
            f"token_dtype uint16 cannot hold a vocabulary of {vocab_size}; use auto or uint32"
        )
    return pa.uint16()


def row_schema(row_len: int, dtype: pa.DataType) -> pa.Schema:
    """Schema of packed rows.

    Args:
        row_len: Tokens per row (``seq_len + 1``).
        dtype: ``pa.uint16()`` or ``pa.uint32()``.
    """
    return pa.schema(
        [
            pa.field("tokens", pa.list_(dtype, row_len), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
            pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
            pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
        ]
    )


def encode_texts(
    tok: Tokenizer, doc_ids: Sequence[str], texts: Sequence[str | None], stats: PackStats
) -> EncodedBatch:
    """Encode one batch with ``encode_batch`` and drop (and count) empty documents.

    Args:
        tok: The tokenizer.
        doc_ids: Stable document ids.
        texts: Document texts (``None`` counts as empty).
        stats: Updated with documents and empty documents.
    """
    keep = [i for i, t in enumerate(texts) if t]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster
    encs = encode([texts[i] for i in keep], add_special_tokens=False)
    id_lists = [e.ids for e in encs]  # each access builds a new Python list: once
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    tokens = np.fromiter(chain.from_iterable(id_lists), dtype=np.uint32, count=int(lengths.sum()))
    nonzero = lengths > 0  # e.g. text the normaliser strips to nothing
    ids = [doc_ids[i] for i, nz in zip(keep, nonzero, strict=True) if nz]
    stats.documents += len(texts)
    stats.empty_documents += len(texts) - len(ids)
    return EncodedBatch(ids, tokens, lengths[nonzero])


def pack_documents(
    batches: Iterable[EncodedBatch], seq_len: int, eos_id: int, dtype: pa.DataType, stats: PackStats
) -> Iterator[pa.RecordBatch]:
    """Join documents with EOS and cut the stream into rows of ``seq_len + 1`` tokens.

    Args:
        batches: Encoded documents in their fixed order.
        seq_len: Model context; rows hold ``seq_len + 1`` tokens.
        eos_id: Appended after every document; also pads the final row.
        dtype: Token storage type.
        stats: Updated with tokens, rows and padding.

    Yields:
        Record batches with :func:`row_schema`.
    """
    L = seq_len + 1
    schema = row_schema(L, dtype)
    # Carry: tokens not yet in a full row, and the documents they belong to. ``pos`` is where
    # each document starts in ``flat``; the first carried document may be a continuation.
    flat = np.empty(0, np.uint32)
    pos = np.empty(0, np.int64)
    is_start = np.empty(0, bool)
    ids: list[str] = []
    for b in batches:
        if len(b.doc_ids) == 0:
            continue
        ends = np.cumsum(b.lengths)
        new = np.insert(b.tokens, ends, eos_id)  # EOS after each document
        starts = np.concatenate([[0], ends[:-1] + np.arange(1, len(ends))])
        stats.document_tokens += len(new)
        pos = np.concatenate([pos, starts + len(flat)])
        flat = np.concatenate([flat, new])
        is_start = np.concatenate([is_start, np.ones(len(starts), bool)])
        ids = ids + list(b.doc_ids)
        n = len(flat) // L
        if n == 0:
            continue
        yield _rows(flat[: n * L], np.full(n, L, np.int32), pos, is_start, ids, L, schema)
        stats.rows += n
        cut = n * L
        if cut == len(flat):
            flat, pos, is_start, ids = flat[:0], pos[:0], is_start[:0], []
            continue
        k0 = int(np.searchsorted(pos, cut, side="right")) - 1  # document holding token `cut`
        is_start = is_start[k0:].copy()
        is_start[0] = pos[k0] == cut
        pos = np.maximum(pos[k0:] - cut, 0)
        ids = ids[k0:]
        flat = flat[cut:]
    if len(flat):
        length = len(flat)
        padded = np.concatenate([flat, np.full(L - length, eos_id, np.uint32)])
        yield _rows(padded, np.array([length], np.int32), pos, is_start, ids, L, schema)
        stats.rows += 1
        stats.padding_tokens += L - length


def _rows(
    flat: np.ndarray,
    lengths: np.ndarray,
    pos: np.ndarray,
    is_start: np.ndarray,
    ids: list[str],
    L: int,
    schema: pa.Schema,
) -> pa.RecordBatch:
    n = len(flat) // L
    starts = pos[is_start]
    starts = starts[starts < n * L]
    start_offsets = np.searchsorted(starts // L, np.arange(n + 1), side="left").astype(np.int32)
    row_begin = np.arange(n, dtype=np.int64) * L
    row_last = row_begin + lengths - 1
    first = np.searchsorted(pos, row_begin, side="right") - 1
    last = np.searchsorted(pos, row_last, side="right") - 1
    counts = last - first + 1
    id_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    take = np.repeat(first - id_offsets[:-1], counts) + np.arange(id_offsets[-1])
    dtype = schema.field("tokens").type.value_type
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(dtype.to_pandas_dtype())), L)
    return pa.RecordBatch.from_arrays(
        [
            tokens,
            pa.array(lengths, pa.int32()),
            pa.ListArray.from_arrays(
                pa.array(start_offsets), pa.array((starts % L).astype(np.int32))
            ),
            pa.ListArray.from_arrays(pa.array(id_offsets), pa.array(ids, pa.string()).take(take)),
        ],
        schema=schema,
    )


def encode_and_pack(
    tok: Tokenizer,
    documents: Iterable[tuple[Sequence[str], Sequence[str | None]]],
    seq_len: int,
    eos_id: int,
    dtype: pa.DataType,
    stats: PackStats,
) -> Iterator[pa.RecordBatch]:
    """Encode batches of ``(doc_ids, texts)`` and pack them into rows, streaming.

    Args:
        tok: The tokenizer.
        documents: Batches of document ids and texts, in their fixed order.
        seq_len: Model context; rows hold ``seq_len + 1`` tokens.
        eos_id: Document separator id.
        dtype: Token storage type.
        stats: Updated with every counter.
    """
    if not tok.encode_special_tokens:
        # A document's text that spells "<|endoftext|>" must not become a separator.
        tok = Tokenizer.from_str(tok.to_str())
        tok.encode_special_tokens = True
    encoded = (encode_texts(tok, ids, texts, stats) for ids, texts in documents)
    yield from pack_documents(encoded, seq_len, eos_id, dtype, stats)
