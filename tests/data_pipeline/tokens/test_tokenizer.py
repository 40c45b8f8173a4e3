"""Tokenizer training, loading and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible.config import validate
from crucible.data_pipeline.shards.spec import ShardSpec, TokenizerSpec, TokenizerTrainSpec
from crucible.data_pipeline.tokens.tokenizer import (
    build_tokenizer,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from crucible.errors import CrucibleError

CORPUS = [f"Document {i}: the cat sat on the mat, naïve café — 東京 {i * 7}." for i in range(300)]


def test_trained_bpe_round_trips_any_text_and_has_eos() -> None:
    tok = train_tokenizer(
        CORPUS, TokenizerTrainSpec(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"])
    )
    assert 256 < tok.get_vocab_size() <= 400
    assert eos_id(tok, "<|endoftext|>") == 0
    assert tok.token_to_id("<|pad|>") == 1
    # byte-level: text never seen in training (emoji, Cyrillic) encodes and decodes exactly
    text = "Привет 🌍 the cat\n\ttabs"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert len(tok.encode("the cat sat on the mat").ids) < len("the cat sat on the mat")


def test_fingerprint_survives_save_and_load_and_tells_tokenizers_apart(tmp_path: Path) -> None:
    a = train_tokenizer(CORPUS, TokenizerTrainSpec(vocab_size=400))
    save_tokenizer(a, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)  # a directory holding tokenizer.json works too
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(a)
    b = train_tokenizer(CORPUS, TokenizerTrainSpec(vocab_size=300))
    assert tokenizer_fingerprint(b) != tokenizer_fingerprint(a)


def test_sample_docs_limits_the_training_corpus() -> None:
    seen: list[str] = []

    def texts():
        for t in CORPUS:
            seen.append(t)
            yield t

    train_tokenizer(texts(), TokenizerTrainSpec(vocab_size=300, sample_docs=10))
    assert len(seen) <= 11


def test_load_errors_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CrucibleError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(CrucibleError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad)


def test_build_from_path_checks_the_eos_token(tmp_path: Path) -> None:
    tok = train_tokenizer(
        CORPUS, TokenizerTrainSpec(vocab_size=300, special_tokens=["<s>"], eos_token="<s>")
    )
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    ok = build_tokenizer(TokenizerSpec(path=str(tmp_path / "tokenizer.json"), eos_token="<s>"), [])
    assert tokenizer_fingerprint(ok) == tokenizer_fingerprint(tok)
    with pytest.raises(CrucibleError, match="no EOS token '<\\|endoftext\\|>'"):
        build_tokenizer(TokenizerSpec(path=str(tmp_path / "tokenizer.json")), [])


def test_spec_rejects_ambiguous_or_inconsistent_tokenizer_sections() -> None:
    with pytest.raises(CrucibleError, match=r"exactly one of tokenizer\.train or tokenizer\.path"):
        validate(ShardSpec, {"tokenizer": {"train": {}, "path": "t.json"}})
    with pytest.raises(CrucibleError, match="must be one of special_tokens"):
        validate(ShardSpec, {"tokenizer": {"train": {"special_tokens": ["<s>"]}}})
    with pytest.raises(CrucibleError, match=r"unknown key tokenizer\.train\.vocab"):
        validate(ShardSpec, {"tokenizer": {"train": {"vocab": 5}}})
    assert validate(ShardSpec, {}).tokenizer.train is not None
