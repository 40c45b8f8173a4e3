"""Train a byte-level BPE tokenizer on the clean corpus, or load a tokenizer.json; fingerprint it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.shards.spec import TokenizerSpec, TokenizerTrainSpec
from crucible.errors import CrucibleError


def train_tokenizer(texts: Iterable[str], spec: TokenizerTrainSpec) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer.

    Args:
        texts: Document texts; only the first ``spec.sample_docs`` are used.
        spec: Vocabulary size, special tokens, minimum pair frequency, sample size.

    Returns:
        The trained tokenizer; every byte is in the vocabulary, so no text is out of vocabulary.
    """
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
