"""Packing: every token of every document survives, in order, with boundaries and lineage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crucible.data_pipeline.shards.spec import TokenizerTrainSpec
from crucible.data_pipeline.tokens.pack import (
    EncodedBatch,
    PackStats,
    encode_and_pack,
    pack_documents,
    token_dtype,
)
from crucible.data_pipeline.tokens.tokenizer import train_tokenizer
from crucible.errors import CrucibleError

EOS = 0


def _batches(docs: list[tuple[str, np.ndarray]], cuts: list[int]) -> list[EncodedBatch]:
    out, prev = [], 0
    for c in [*sorted(set(cuts)), len(docs)]:
        chunk = [d for d in docs[prev:c] if len(d[1])]
        prev = c
        tokens = np.concatenate([d[1] for d in chunk]) if chunk else np.empty(0, np.uint32)
        out.append(
            EncodedBatch(
                [d[0] for d in chunk], tokens, np.array([len(d[1]) for d in chunk], np.int64)
            )
        )
    return out


def _pack(docs, cuts, seq_len, stats=None):
    stats = stats or PackStats()
    rows = list(pack_documents(_batches(docs, cuts), seq_len, EOS, pa.uint16(), stats))
    return (pa.Table.from_batches(rows) if rows else None), stats


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    seq_len=st.integers(1, 17),
    cuts=st.lists(st.integers(0, 30), max_size=5),
    seed=st.integers(0, 1000),
)
def test_round_trip_restores_every_token_of_every_document(
    lengths, seq_len, cuts, seed, unpack_rows
) -> None:
    rng = np.random.default_rng(seed)
    docs = [(f"d{i}", rng.integers(1, 60000, n).astype(np.uint32)) for i, n in enumerate(lengths)]
    table, stats = _pack(docs, [c for c in cuts if c <= len(docs)], seq_len)
    expected = [(i, t) for i, t in docs if len(t)]
    if not expected:
        assert table is None and stats.rows == 0
        return
    got = unpack_rows(table)
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, g), (_, e) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    L = seq_len + 1
    lengths_col = table.column("length").to_pylist()
    assert all(n == L for n in lengths_col[:-1]) and 0 < lengths_col[-1] <= L
    assert stats.rows == table.num_rows
    assert stats.document_tokens == sum(len(t) + 1 for _, t in expected)
    assert stats.padding_tokens == L - lengths_col[-1]
    # a document starts exactly after each EOS
    flat = table.column("tokens").combine_chunks().flatten().to_numpy()
    for r, starts in enumerate(table.column("doc_starts").to_pylist()):
        for s in starts:
            p = r * L + s
            assert p == 0 or flat[p - 1] == EOS


def test_over_long_document_is_split_across_rows_never_dropped(unpack_rows) -> None:
    seq_len = 7
    long = np.arange(1, 5 * (seq_len + 1) + 3, dtype=np.uint32)
    docs = [
        ("short", np.array([9, 9], np.uint32)),
        ("long", long),
        ("tail", np.array([7], np.uint32)),
    ]
    table, _ = _pack(docs, [], seq_len)
    ids = table.column("doc_ids").to_pylist()
    assert ids[0] == ["short", "long"]
    assert all(row == ["long"] for row in ids[1:5])
    assert ids[-1][-1] == "tail"
    assert table.column("doc_starts").to_pylist()[0] == [0, 3]
    assert [d for d, _ in unpack_rows(table)] == ["short", "long", "tail"]
    np.testing.assert_array_equal(unpack_rows(table)[1][1], long)


def test_encode_and_pack_skips_and_counts_empty_documents(unpack_rows) -> None:
    tok = train_tokenizer(["hello world, hello tokens"] * 50, TokenizerTrainSpec(vocab_size=300))
    texts = ["hello world", "", None, "tokens hello", "x" * 500]
    ids = [f"d{i}" for i in range(len(texts))]
    stats = PackStats()
    rows = list(
        encode_and_pack(
            tok, [(ids[:2], texts[:2]), (ids[2:], texts[2:])], 16, EOS, pa.uint16(), stats
        )
    )
    table = pa.Table.from_batches(rows)
    assert (stats.documents, stats.empty_documents) == (5, 2)
    got = unpack_rows(table)
    assert [d for d, _ in got] == ["d0", "d3", "d4"]
    assert [tok.decode(t.tolist()) for _, t in got] == ["hello world", "tokens hello", "x" * 500]


def test_token_dtype_picks_the_smallest_that_fits() -> None:
    assert token_dtype(65536) == pa.uint16()
    assert token_dtype(65537) == pa.uint32()
    assert token_dtype(100, "uint32") == pa.uint32()
    with pytest.raises(CrucibleError, match="uint16 cannot hold"):
        token_dtype(70000, "uint16")


def test_special_token_text_inside_a_document_stays_text(unpack_rows) -> None:
    tok = train_tokenizer(["plain words here"] * 50, TokenizerTrainSpec(vocab_size=300))
    text = "before <|endoftext|> after"
    rows = list(
        encode_and_pack(tok, [(["a", "b"], [text, "next"])], 64, EOS, pa.uint16(), PackStats())
    )
    table = pa.Table.from_batches(rows)
    tokens = table.column("tokens").to_pylist()[0][: table.column("length").to_pylist()[0]]
    assert tokens.count(EOS) == 2  # only the two separators
    assert tok.encode_special_tokens is False  # the caller's tokenizer is left as it was
    got = unpack_rows(table)
    assert tok.decode(got[0][1].tolist(), skip_special_tokens=False) == text
