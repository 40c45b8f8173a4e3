"""The ``data.shards`` section of a run spec: tokenizer, packing, shuffle, split, shard layout."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from crucible.config import StrictModel

EOS_TOKEN = "<|endoftext|>"
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerTrainSpec(StrictModel):
    """Train a tokenizer on the clean documents: byte-level BPE, or BERT's uncased WordPiece."""

    model: Literal["bpe", "wordpiece"] = Field(
        "bpe",
        description="bpe: GPT-2 style byte-level BPE; wordpiece: BERT's uncased WordPiece.",
    )
    vocab_size: int = Field(
        8192,
        ge=260,
        le=1 << 22,
        description="Target vocabulary size, special tokens (and for bpe the 256 bytes) included.",
    )
    special_tokens: list[str] = Field(
        default_factory=lambda: [EOS_TOKEN],
        description="Special tokens added to the vocabulary (ids 0, 1, ...); must include the "
        "EOS token. Default: [<|endoftext|>] for bpe, [PAD] [UNK] [CLS] [SEP] [MASK] for wordpiece.",
    )
    eos_token: str = Field(
        EOS_TOKEN,
        description="Token appended after every document when packing. Default: <|endoftext|> "
        "for bpe, [SEP] for wordpiece.",
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair is merged only if it occurs at least this many times."
    )
    sample_docs: int | None = Field(
        100_000,
        ge=1,
        description="Train on the first N documents (in file order); null trains on all.",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_per_model(cls, data: Any) -> Any:
        # Filled in here rather than by field defaults so that the resolved spec names them.
        if not isinstance(data, dict):
            return data
        bert = data.get("model") == "wordpiece"
        data = dict(data)
        data.setdefault("special_tokens", list(BERT_SPECIAL_TOKENS) if bert else [EOS_TOKEN])
        data.setdefault("eos_token", "[SEP]" if bert else EOS_TOKEN)
        return data

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerTrainSpec:
        if self.eos_token not in self.special_tokens:
            raise ValueError(
                f"eos_token {self.eos_token!r} must be one of special_tokens {self.special_tokens}"
            )
        return self

    @model_validator(mode="after")
    def _bert_tokens_present(self) -> TokenizerTrainSpec:
        missing = [t for t in BERT_SPECIAL_TOKENS if t not in self.special_tokens]
        if self.model == "wordpiece" and missing:
            raise ValueError(
                f"special_tokens lacks {' '.join(missing)}: a wordpiece tokenizer needs all of "
                f"BERT's special tokens {' '.join(BERT_SPECIAL_TOKENS)}"
            )
        return self


class TokenizerSpec(StrictModel):
    """Where the tokenizer comes from: exactly one of ``train`` or ``path``."""

    train: TokenizerTrainSpec | None = Field(
        None,
        description="Train a new tokenizer on the corpus (byte-level BPE or BERT's WordPiece).",
    )
    path: str | None = Field(
        None,
        description="Load an existing Hugging Face tokenizer.json from this path or URI "
        "(a file, or a directory holding one).",
    )
    eos_token: str = Field(
        EOS_TOKEN,
        description="EOS token of a loaded tokenizer (ignored when training: train.eos_token is used).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of tokenizer.train or tokenizer.path")
        return self

    @property
    def eos(self) -> str:
        """The EOS token that separates documents in packed rows."""
        return self.train.eos_token if self.train is not None else self.eos_token


class ShardSpec(StrictModel):
    """Clean documents → tokenizer → packed rows of ``seq_len + 1`` tokens → Arrow shards."""

    tokenizer: TokenizerSpec = Field(
        default_factory=lambda: TokenizerSpec(train=TokenizerTrainSpec()),
        description="Train a tokenizer or load one from tokenizer.json.",
    )
    seq_len: int = Field(
        1024,
        ge=1,
        le=1 << 20,
        description="Model context length; each stored row holds seq_len + 1 tokens (inputs and shifted labels).",
    )
    shuffle_seed: int = Field(
        0,
        ge=0,
        description="Seed of the deterministic global shuffle of packed rows before sharding.",
    )
    heldout_fraction: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="Fraction of rows reserved as the held-out (evaluation) split.",
    )
    heldout_rows: int | None = Field(
        None,
        ge=0,
        description="Exact number of held-out rows; overrides heldout_fraction when set.",
    )
    rows_per_shard: int = Field(
        8192,
        ge=1,
        description="Rows per Arrow shard file (the last shard of each split may be shorter).",
    )
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto",
        description="Token storage type; auto picks uint16 when the vocabulary fits, else uint32.",
    )
    verify: Literal["size", "sha256", "auto"] = Field(
        "auto",
        description="Check on open: file sizes only, full sha256, or auto (sha256 when the set is at most 2 GiB).",
    )
    encode_batch_size: int = Field(
        1024, ge=1, description="Documents per tokenizer encode_batch call."
    )
