"""Train a tokenizer on the clean corpus (byte-level BPE, or BERT's uncased WordPiece) or load a
tokenizer.json; fingerprint it; find the special tokens masked-language-model training needs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.shards.spec import (
    BERT_SPECIAL_TOKENS,
    TokenizerSpec,
    TokenizerTrainSpec,
)
from crucible.errors import CrucibleError


def train_tokenizer(texts: Iterable[str], spec: TokenizerTrainSpec) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE or a BERT uncased WordPiece tokenizer (``spec.model``).

    Args:
        texts: Document texts; only the first ``spec.sample_docs`` are used.
        spec: Model, vocabulary size, special tokens, minimum pair frequency, sample size.

    Returns:
        The trained tokenizer. BPE has every byte in its vocabulary, so no text is out of
        vocabulary; WordPiece lowercases, strips accents, and maps a word it cannot spell to
        ``[UNK]``. Neither adds special tokens around an encoding by itself.
    """
    trainer: trainers.Trainer
    if spec.model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=list(spec.special_tokens),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=spec.min_frequency,
            special_tokens=list(spec.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    sample: Iterator[str] = iter(texts)
    if spec.sample_docs is not None:
        sample = islice(sample, spec.sample_docs)
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path | Location) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` (a file, or a directory that holds one).

    Args:
        path: The file, or a directory containing ``tokenizer.json`` (a path or URI).
    """
    p = location(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        text = p.read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise CrucibleError(
            f"tokenizer file {p} does not exist; give the path of a tokenizer.json"
        ) from None
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception subclasses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CrucibleError(f"{p} is not a valid tokenizer.json: {first}") from None


def build_tokenizer(spec: TokenizerSpec, texts: Iterable[str]) -> Tokenizer:
    """Train (``spec.train``) or load (``spec.path``) the tokenizer, and check its EOS token.

    Args:
        spec: The ``tokenizer`` section of the shard spec.
        texts: Corpus texts, consumed only when training.
    """
    if spec.train is not None:
        tok = train_tokenizer(texts, spec.train)
    else:
        assert spec.path is not None  # TokenizerSpec guarantees exactly one source
        tok = load_tokenizer(spec.path)
    eos_id(tok, spec.eos)
    return tok


def eos_id(tok: Tokenizer, eos_token: str) -> int:
    """The id of ``eos_token``, or a clear error when the tokenizer lacks it.

    Args:
        tok: The tokenizer.
        eos_token: The document separator, e.g. ``<|endoftext|>``.
    """
    tid = tok.token_to_id(eos_token)
    if tid is None:
        raise CrucibleError(
            f"the tokenizer has no EOS token {eos_token!r}; set shards.tokenizer.eos_token "
            "to one of its special tokens"
        )
    return tid


def bert_special_ids(tok: Tokenizer) -> dict[str, int]:
    """The ids of BERT's special tokens, keyed ``pad``, ``unk``, ``cls``, ``sep``, ``mask``.

    Args:
        tok: The shards' tokenizer.

    Raises:
        CrucibleError: The tokenizer lacks one of ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
    """
    ids = {}
    for token in BERT_SPECIAL_TOKENS:
        tid = tok.token_to_id(token)
        if tid is None:
            raise CrucibleError(
                f"the shards' tokenizer has no {token} token: masked-language-model training "
                "needs BERT's special tokens; build the shards with tokenizer.train.model: "
                "wordpiece"
            )
        ids[token.strip("[]").lower()] = tid
    return ids


def continuation_mask(tok: Tokenizer) -> np.ndarray:
    """Which ids continue a word (WordPiece's ``##`` pieces), for whole-word masking.

    Args:
        tok: The tokenizer; for a model other than WordPiece no id is a continuation.

    Returns:
        A bool array of length ``tok.get_vocab_size()``.
    """
    mask = np.zeros(tok.get_vocab_size(), bool)
    if isinstance(tok.model, models.WordPiece):
        prefix = tok.model.continuing_subword_prefix
        for token, tid in tok.get_vocab().items():
            mask[tid] = token.startswith(prefix)
    return mask


def canonical_json(tok: Tokenizer) -> str:
    """The tokenizer serialised with sorted keys and no whitespace (stable across saves)."""
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the canonical tokenizer.json: equal fingerprints mean identical tokenization.

    Args:
        tok: The tokenizer.
    """
    return hashlib.sha256(canonical_json(tok).encode()).hexdigest()


def save_tokenizer(tok: Tokenizer, path: str | Path | Location) -> None:
    """Write the canonical tokenizer.json to ``path`` (the fingerprint is of these bytes).

    Args:
        tok: The tokenizer.
        path: Destination file (a path or URI).
    """
    location(path).write_text(canonical_json(tok))
