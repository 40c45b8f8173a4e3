"""Encode rendered conversations with a loss mask and pack whole examples into rows.

Unlike pretraining text, an example is never cut across rows: a row holds several complete
conversations (first fit over a few open rows, in input order, so the packing is
deterministic and rows fill well), each followed by EOS, and the rest of the row is padding.
Every token carries a loss-mask bit: 1 where it is a training target (an assistant turn, its
end marker and the EOS after the conversation), 0 for headers, user and system turns and
padding. An example longer than a row is dropped and counted, never truncated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from crucible.data_pipeline.chat import Template, split_comparison, split_rendered
from crucible.data_pipeline.tokens.pack import PackStats, row_schema

OPEN_ROWS = 16  # rows kept open for first-fit packing; the oldest is closed past this

# (document id, token ids, per-token mask, offsets where the example's documents start)
Example = tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]


def chat_row_schema(row_len: int, dtype: pa.DataType) -> pa.Schema:
    """:func:`~.pack.row_schema` plus ``loss_mask``: one uint8 per token, 1 on targets."""
    return row_schema(row_len, dtype).append(
        pa.field("loss_mask", pa.list_(pa.uint8(), row_len), nullable=False)
    )


def encode_examples(
    tok: Tokenizer,
    doc_ids: Sequence[str],
    texts: Sequence[str | None],
    template: Template,
    eos_id: int,
    max_len: int,
    stats: PackStats,
) -> Iterator[Example]:
    """``(doc_id, token ids, loss mask, starts)`` of each conversation that fits in
    ``max_len`` (one document: ``starts`` is ``(0,)``).

    Each piece of the rendered text (headers, turns) is encoded on its own, so a piece's
    tokens never merge with its neighbour's and the mask falls on token boundaries.

    Args:
        tok: the tokenizer (special tokens encoded as text).
        doc_ids: document ids.
        texts: rendered conversations.
        template: the template they were rendered with.
        eos_id: appended after each conversation, and trained.
        max_len: longest example kept (a row's tokens).
        stats: documents, empty, too long, tokens and targets counted.
    """
    pieces = [split_rendered(t, template) if t else [] for t in texts]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    flat = [p for ps in pieces for p, _ in ps]
    encoded = iter(e.ids for e in encode(flat, add_special_tokens=False))
    stats.documents += len(texts)
    for doc_id, ps in zip(doc_ids, pieces, strict=True):
        ids_per_piece = [next(encoded) for _ in ps]
        n = sum(map(len, ids_per_piece)) + 1
        ids = np.fromiter(chain(*ids_per_piece, [eos_id]), np.uint32, count=n)
        mask = np.fromiter(
            chain(*([int(tr)] * len(i) for i, (_, tr) in zip(ids_per_piece, ps, strict=True)), [1]),
            np.uint8,
            count=n,
        )
        if n == 1:
            stats.empty_documents += 1
        elif not mask[:-1].any():
            stats.untrained += 1  # no assistant turn survived the pipeline's steps
        elif n > max_len:
            stats.too_long += 1
        else:
            yield doc_id, ids, mask, (0,)


def encode_conversations(
    tok: Tokenizer, texts: Sequence[str], template: Template, eos_id: int
) -> list[list[int]]:
    """Token ids of rendered conversations as the shards hold them: each piece (header,
    turn) encoded on its own, then EOS. A reward model scores a conversation at that EOS.

    Args:
        tok: the tokenizer (special tokens encoded as text).
        texts: rendered conversations.
        template: their template.
        eos_id: appended to each.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pieces = [[p for p, _ in split_rendered(t, template)] for t in texts]
    flat = iter(e.ids for e in encode([p for ps in pieces for p in ps], add_special_tokens=False))
    return [[t for _ in ps for t in next(flat)] + [eos_id] for ps in pieces]


def encode_comparisons(
    tok: Tokenizer,
    doc_ids: Sequence[str],
    texts: Sequence[str | None],
    template: Template,
    eos_id: int,
    max_len: int,
    stats: PackStats,
) -> Iterator[Example]:
    """``(doc_id, token ids, rank mask, starts)`` of each comparison that fits in
    ``max_len``: its answers' conversations back to back (each followed by EOS, each a
    document of its own in the row: it attends only to itself), the mask 0 but on each
    conversation's EOS, where it is the answer's rank + 1 (1: the best). The reward model
    scores each answer at that token.

    Args:
        tok: the tokenizer (special tokens encoded as text).
        doc_ids: document ids.
        texts: comparison texts (:func:`~crucible.data_pipeline.chat.render_comparison`).
        template: the template they were rendered with.
        eos_id: ends each answer's conversation.
        max_len: longest comparison kept (all its answers).
        stats: documents, empty (unparseable), too long, tokens and targets (answers).
    """
    stats.documents += len(texts)
    for doc_id, text in zip(doc_ids, texts, strict=True):
        convs = split_comparison(text or "", template)
        if len(convs) < 2:
            stats.empty_documents += 1
            continue
        ids: list[int] = []
        mask: list[int] = []
        starts: list[int] = []
        for rank, conv in enumerate(encode_conversations(tok, convs, template, eos_id)):
            starts.append(len(ids))
            ids += conv
            mask += [0] * (len(conv) - 1) + [rank + 1]
        if len(ids) > max_len:
            stats.too_long += 1
            continue
        yield (doc_id, np.asarray(ids, np.uint32), np.asarray(mask, np.uint8), tuple(starts))


def pack_examples(
    examples: Iterable[Example],
    seq_len: int,
    eos_id: int,
    dtype: pa.DataType,
    stats: PackStats,
    rows_per_batch: int = 256,
    capacity: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Whole examples into rows of ``seq_len + 1`` tokens, padded with EOS (mask 0).

    Args:
        examples: from :func:`encode_examples` or :func:`encode_comparisons`, each at most
            ``capacity`` tokens.
        seq_len: model context.
        eos_id: the padding id.
        dtype: token storage type.
        stats: rows, tokens, targets and padding counted.
        rows_per_batch: rows per record batch yielded.
        capacity: tokens of a row examples may fill (default all ``seq_len + 1``;
            comparisons keep every scored token among the ``seq_len`` inputs).
    """
    L = seq_len + 1
    cap = L if capacity is None else capacity
    schema = chat_row_schema(L, dtype)
    open_rows: list[list[Example]] = []
    used: list[int] = []
    closed: list[list[Example]] = []
    for ex in examples:
        n = len(ex[1])
        stats.document_tokens += n
        stats.target_tokens += int((ex[2] > 0).sum())
        slot = next((i for i, u in enumerate(used) if u + n <= cap), None)
        if slot is None:
            open_rows.append([])
            used.append(0)
            slot = len(open_rows) - 1
        open_rows[slot].append(ex)
        used[slot] += n
        if used[slot] == cap or len(open_rows) > OPEN_ROWS:
            k = slot if used[slot] == cap else 0
            closed.append(open_rows.pop(k))
            used.pop(k)
        if len(closed) >= rows_per_batch:
            yield _batch(closed, L, eos_id, schema, stats)
            closed = []
    closed += open_rows
    if closed:
        yield _batch(closed, L, eos_id, schema, stats)


def _batch(
    rows: list[list[Example]],
    L: int,
    eos_id: int,
    schema: pa.Schema,
    stats: PackStats,
) -> pa.RecordBatch:
    n = len(rows)
    tokens = np.full((n, L), eos_id, np.uint32)
    mask = np.zeros((n, L), np.uint8)
    lengths = np.zeros(n, np.int32)
    starts: list[list[int]] = []
    for r, row in enumerate(rows):
        pos, s = 0, []
        for _, ids, m, example_starts in row:
            tokens[r, pos : pos + len(ids)] = ids
            mask[r, pos : pos + len(ids)] = m
            s += [pos + k for k in example_starts]
            pos += len(ids)
        lengths[r] = pos
        starts.append(s)
    stats.rows += n
    stats.padding_tokens += int(n * L - lengths.sum())
    value_type = schema.field("tokens").type.value_type
    return pa.RecordBatch.from_arrays(
        [
            pa.FixedSizeListArray.from_arrays(
                pa.array(tokens.reshape(-1).astype(value_type.to_pandas_dtype())), L
            ),
            pa.array(lengths, pa.int32()),
            pa.array(starts, pa.list_(pa.int32())),
            pa.array([[ex[0] for ex in row] for row in rows], pa.list_(pa.string())),
            pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), L),
        ],
        schema=schema,
    )
