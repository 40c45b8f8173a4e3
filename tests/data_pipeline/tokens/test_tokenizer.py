"""Tokenizer training, loading and fingerprints."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crucible.config import validate
from crucible.data_pipeline.shards.spec import (
    EOS_TOKEN,
    ShardSpec,
    TokenizerSpec,
    TokenizerTrainSpec,
)
from crucible.data_pipeline.tokens.pack import PackStats, encode_and_pack
from crucible.data_pipeline.tokens.tokenizer import (
    bert_special_ids,
    build_tokenizer,
    continuation_mask,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from crucible.errors import CrucibleError

BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
STEMS = ["walk", "talk", "jump", "play", "happy", "kind", "run"]
WORDS = [s + x for s in STEMS for x in ("", "ed", "ing", "er", "ers", "ly")]
WORDS += ["the", "a", "cat", "dog", "sat", "on", "under", "mat", "table", "quickly"]
_rng = random.Random(0)
ENGLISH = [
    " ".join(_rng.choice(WORDS) for _ in range(_rng.randint(4, 12))).capitalize() + "."
    for _ in range(400)
]
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


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(ENGLISH, TokenizerTrainSpec(model="wordpiece", vocab_size=300))


def test_wordpiece_is_bert_uncased_with_special_tokens_first(wordpiece) -> None:
    assert [wordpiece.id_to_token(i) for i in range(5)] == BERT
    assert bert_special_ids(wordpiece) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert wordpiece.encode("The CAT Sat.").ids == wordpiece.encode("the cat sat.").ids
    enc = wordpiece.encode("the unkindly walkers", add_special_tokens=False)
    assert any(t.startswith("##") for t in enc.tokens)
    # no post-processor: nothing adds [CLS] ... [SEP] behind packing's back
    assert wordpiece.post_processor is None
    plain = wordpiece.encode("the cat", add_special_tokens=False)
    assert wordpiece.encode("the cat").ids == plain.ids
    text = "the happy runner jumped on the table unkindly."
    decoded = wordpiece.decode(wordpiece.encode(text).ids)
    assert "".join(decoded.split()) == "".join(text.split())  # equal up to spacing


def test_continuation_mask_marks_wordpiece_continuations_only(wordpiece) -> None:
    mask = continuation_mask(wordpiece)
    assert mask.dtype == bool and len(mask) == wordpiece.get_vocab_size()
    vocab = wordpiece.get_vocab()
    assert mask.sum() > 0
    assert all(mask[i] == t.startswith("##") for t, i in vocab.items())
    bpe = train_tokenizer(CORPUS, TokenizerTrainSpec(vocab_size=300))
    assert not continuation_mask(bpe).any()


def test_bert_special_ids_of_a_bpe_tokenizer_is_a_one_line_error() -> None:
    bpe = train_tokenizer(CORPUS, TokenizerTrainSpec(vocab_size=300))
    with pytest.raises(CrucibleError, match=r"no \[PAD\] token.*model: wordpiece") as e:
        bert_special_ids(bpe)
    assert "\n" not in str(e.value)


def test_spec_defaults_follow_the_model() -> None:
    bpe = TokenizerTrainSpec()
    assert (bpe.model, bpe.special_tokens, bpe.eos_token) == ("bpe", [EOS_TOKEN], EOS_TOKEN)
    assert TokenizerTrainSpec(vocab_size=300).special_tokens == [EOS_TOKEN]
    assert ShardSpec().tokenizer.train == bpe
    wp = validate(ShardSpec, {"tokenizer": {"train": {"model": "wordpiece"}}}).tokenizer
    assert wp.train is not None and wp.train.special_tokens == BERT and wp.eos == "[SEP]"
    dumped = wp.train.model_dump()
    assert dumped["special_tokens"] == BERT and TokenizerTrainSpec(**dumped) == wp.train


def test_wordpiece_spec_without_every_bert_token_is_refused() -> None:
    no_mask = {"model": "wordpiece", "special_tokens": BERT[:4]}
    with pytest.raises(CrucibleError, match=r"special_tokens lacks \[MASK\]"):
        validate(ShardSpec, {"tokenizer": {"train": no_mask}})
    with pytest.raises(CrucibleError, match="must be one of special_tokens"):
        validate(ShardSpec, {"tokenizer": {"train": {"model": "wordpiece", "eos_token": "<s>"}}})


def test_packing_with_wordpiece_separates_documents_with_sep_only(wordpiece) -> None:
    sep = eos_id(wordpiece, "[SEP]")
    texts = ["the cat sat [SEP] on the [MASK] mat [CLS].", "The dog ran."]
    rows = list(
        encode_and_pack(wordpiece, [(["a", "b"], texts)], 64, sep, pa.uint16(), PackStats())
    )
    table = pa.Table.from_batches(rows)
    tokens = np.array(table.column("tokens").to_pylist()[0][: table.column("length")[0].as_py()])
    assert (tokens == sep).sum() == 2  # the two document separators, not the literal text
    assert not np.isin(tokens, [0, 2, 4]).any()  # nor [PAD] [CLS] [MASK] spelled in the text
    first = tokens[: np.flatnonzero(tokens == sep)[0]]
    assert wordpiece.decode(first.tolist()).startswith("the cat sat")
