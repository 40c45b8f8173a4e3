"""One task of the shard build: encode and pack one clean-documents file into an Arrow file
of rows (plain text: EOS-separated and cut into rows; chat: whole conversations with a loss
mask)."""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from crucible.cluster.storage import location
from crucible.data_pipeline.chat import TEMPLATES
from crucible.data_pipeline.tokens.pack import PackStats, encode_and_pack, row_schema
from crucible.data_pipeline.tokens.pack_chat import (
    chat_row_schema,
    encode_comparisons,
    encode_examples,
    pack_examples,
)


@functools.lru_cache(maxsize=2)
def _tokenizer(uri: str) -> Tokenizer:
    return Tokenizer.from_str(location(uri).read_text())


def pack_file(job: dict[str, Any]) -> dict[str, Any]:
    """Encode and pack one input file into an Arrow file of rows (one task).

    Args:
        job: ``path`` (documents file), ``out`` (packed file), ``tokenizer`` (the saved
            tokenizer.json's URI), ``seq_len``, ``eos_id``, ``dtype``, ``batch_size``;
            chat documents: ``chat_template``, and ``comparisons`` for ranked answers.

    Returns:
        The file's :class:`PackStats` as a dict, with ``out``.
    """
    tok = _tokenizer(str(job["tokenizer"]))
    dtype = pa.type_for_alias(str(job["dtype"]))
    stats = PackStats()
    batches = pq.ParquetFile(location(str(job["path"])).open_read()).iter_batches(
        batch_size=int(job["batch_size"]), columns=["id", "text"]
    )
    docs = ((b.column(0).to_pylist(), b.column(1).to_pylist()) for b in batches)
    seq_len, eos = int(job["seq_len"]), int(job["eos_id"])
    template = job.get("chat_template")
    schema = shard_schema(seq_len + 1, dtype, template)
    if template is None:
        rows = encode_and_pack(tok, docs, seq_len, eos, dtype, stats)
    else:
        tok = text_specials(tok)
        # a comparison's scored tokens (each answer's EOS) must all be inputs: seq_len of them
        comparisons = bool(job.get("comparisons"))
        encode, cap = (
            (encode_comparisons, seq_len) if comparisons else (encode_examples, seq_len + 1)
        )
        examples = (
            ex
            for ids, texts in docs
            for ex in encode(tok, ids, texts, TEMPLATES[template], eos, cap, stats)
        )
        rows = pack_examples(examples, seq_len, eos, dtype, stats, capacity=cap)
    with (
        location(str(job["out"])).writing() as pending,
        pa.OSFile(str(pending.path), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        for rb in rows:
            writer.write_batch(rb)
    return {"out": job["out"], **asdict(stats)}


def shard_schema(row_len: int, dtype: pa.DataType, chat_template: str | None) -> pa.Schema:
    """The packed rows' schema: with a ``loss_mask`` column for chat shards."""
    return (row_schema if chat_template is None else chat_row_schema)(row_len, dtype)


def text_specials(tok: Tokenizer) -> Tokenizer:
    """``tok`` encoding special tokens as plain text (a document never holds an EOS)."""
    if tok.encode_special_tokens:
        return tok
    tok = Tokenizer.from_str(tok.to_str())
    tok.encode_special_tokens = True
    return tok
