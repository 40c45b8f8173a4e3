"""Masked-LM batches: layout, the 15% / 80-10-10 rule, whole words, NSP and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from crucible.data_pipeline.tokens.masking import IGNORE, MaskedLMBatcher

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
PAD, CLS, SEP, MASK = 0, 2, 3, 4
V = 1000


def _rows(n: int, R: int, seed: int = 0, seps: bool = False) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(5, V, (n, R)).astype(np.uint16)
    if seps:  # document separators inside packed rows
        rows[:, ::7] = SEP
    return rows


def _original(out: dict[str, np.ndarray]) -> np.ndarray:
    return np.where(out["labels"] != IGNORE, out["labels"], out["input_ids"])


def _call(batcher: MaskedLMBatcher, rows: np.ndarray, length=None, index=None):
    length = np.full(len(rows), rows.shape[1]) if length is None else np.asarray(length)
    index = np.arange(len(rows), dtype=np.int64) if index is None else np.asarray(index)
    return batcher(rows, length, index)


def test_shapes_dtypes_and_layout_without_nsp() -> None:
    rows = _rows(4, 17, seps=True)
    out = _call(MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=1), rows, [17, 16, 5, 0])
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "input_ids": ((4, 16), np.int64),
        "labels": ((4, 16), np.int64),
        "token_type_ids": ((4, 16), np.int64),
        "doc_index": ((4, 16), np.int32),
    }
    orig = _original(out)
    for b, n in enumerate([14, 14, 5, 0]):  # [CLS] content[: T - 2] [SEP], then padding
        np.testing.assert_array_equal(orig[b, : n + 2], [CLS, *rows[b, :n], SEP])
        assert (out["input_ids"][b, n + 2 :] == PAD).all()
        assert (out["labels"][b, n + 2 :] == IGNORE).all()
        assert (out["doc_index"][b, : n + 2] == 0).all() and (
            out["doc_index"][b, n + 2 :] == -1
        ).all()
    assert (out["token_type_ids"] == 0).all()
    assert (out["labels"][3] == IGNORE).all()  # no text: nothing to mask


def test_special_ids_are_never_masked_nor_drawn_as_random_tokens() -> None:
    rows = _rows(300, 33, seps=True)
    rows[:, 5] = 1  # [UNK] in the text
    rows[:, 9] = PAD
    out = _call(MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, mask_prob=0.5), rows)
    masked = out["labels"] != IGNORE
    assert masked.any(axis=1).all()
    assert not np.isin(out["labels"][masked], list(SPECIAL.values())).any()
    orig = _original(out)
    replaced = masked & (out["input_ids"] != MASK) & (out["input_ids"] != orig)
    assert replaced.sum() > 100 and not np.isin(out["input_ids"][replaced], [0, 1, 2, 3]).any()


def test_random_tokens_are_uniform_over_the_non_special_ids() -> None:
    special = {"pad": 7, "unk": 3, "cls": 9, "sep": 8, "mask": 19}  # scattered, 19 the last id
    rows = np.random.default_rng(0).integers(0, 3, (400, 51))  # no special ids
    batcher = MaskedLMBatcher(
        special=special,
        vocab_size=20,
        seed=0,
        mask_prob=1.0,
        mask_token_prob=0.0,
        random_token_prob=1.0,
    )
    drawn = _call(batcher, rows)["input_ids"][:, 1:49].ravel()  # 19,200 draws over 15 ids
    counts = np.bincount(drawn, minlength=20)
    assert set(np.flatnonzero(counts)) == set(range(20)) - set(special.values())
    expected = len(drawn) / 15  # 1,280 each; one sd is about 35
    assert np.abs(counts[counts > 0] - expected).max() < 5 * np.sqrt(expected)


def test_rates_match_devlin_et_al() -> None:
    # 2,000 rows of 129 tokens: T = 128, 126 text tokens, each row masks round(0.15 * 126) = 19.
    rows = _rows(2000, 129, seed=3)
    out = _call(MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=7), rows)
    masked = out["labels"] != IGNORE
    assert (masked.sum(axis=1) == 19).all()
    ids, labels = out["input_ids"][masked], out["labels"][masked]
    k = len(ids)  # 38,000 draws: one standard deviation of the 0.8 share is 0.0021
    share = {
        "mask": (ids == MASK).mean(),
        "random": ((ids != MASK) & (ids != labels)).mean(),
        "kept": (ids == labels).mean(),  # includes random draws of the same id (p = 1/995)
    }
    for name, p in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(share[name] - p) < 4 * np.sqrt(p * (1 - p) / k), (name, share[name])
    # every text position is chosen with probability 19 / 126; 5 sd over 2,000 rows is 0.040
    per_position = masked[:, 1:127].mean(axis=0)
    assert np.abs(per_position - 19 / 126).max() < 5 * np.sqrt(0.15 * 0.85 / 2000)
    assert not masked[:, 0].any() and not masked[:, 127].any()


def test_a_rows_result_depends_only_on_seed_index_epoch_and_content() -> None:
    rows = _rows(6, 33)
    batcher = MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=5)
    index = np.array([10, 11, 12, 13, 14, 15])
    both = _call(batcher, rows, index=index)
    again = _call(batcher, rows, index=index)
    alone = _call(batcher, rows[3:4], index=index[3:4])
    for key in both:
        np.testing.assert_array_equal(both[key], again[key])
        np.testing.assert_array_equal(both[key][3:4], alone[key])
    other = _call(MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=6), rows, index=index)
    assert not np.array_equal(other["labels"], both["labels"])
    # a sample read again in a later epoch is masked anew (dynamic masking), and the same in
    # every read of that epoch
    length = np.full(len(rows), rows.shape[1])
    first = batcher(rows, length, index, np.zeros(6, np.int64))
    for key in both:
        np.testing.assert_array_equal(first[key], both[key])
    later = batcher(rows, length, index, np.ones(6, np.int64))
    assert not np.array_equal(later["labels"], both["labels"])
    np.testing.assert_array_equal(batcher(rows, length, index, np.ones(6, np.int64))["labels"],
                                  later["labels"])  # fmt: skip


def _words(orig: np.ndarray, cont: np.ndarray) -> list[list[int]]:
    """Positions of each word of a laid-out row: text positions, continuations glued on."""
    words: list[list[int]] = []
    for pos, tid in enumerate(orig.tolist()):
        if tid < 5:
            continue
        if words and words[-1][-1] == pos - 1 and cont[tid]:
            words[-1].append(pos)
        else:
            words.append([pos])
    return words


def test_whole_word_masking_never_splits_a_word() -> None:
    cont = np.zeros(V, bool)
    cont[600:] = True  # ids 600.. continue the word before them: 40% of tokens
    rows = _rows(500, 65, seed=2, seps=True)
    batcher = MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, whole_word=cont)
    out = _call(batcher, rows)
    masked = out["labels"] != IGNORE
    orig = _original(out)
    multi = 0
    for b in range(len(rows)):
        words = _words(orig[b], cont)
        target = max(1, round(0.15 * sum(map(len, words))))
        assert 0 < masked[b].sum() <= target
        for w in words:
            assert masked[b, w].all() or not masked[b, w].any()
            multi += int(len(w) > 1 and masked[b, w].all())
    assert multi > 100
    # a continuation right after a [SEP] separator starts a word of its own
    sep = (orig == SEP) & (np.arange(orig.shape[1]) > 0)
    sep[:, -1] = False
    row, at = np.nonzero(sep)
    before, after = orig[row, at - 1], orig[row, at + 1]
    glued = cont[after] & (after >= 5) & (before >= 5)
    differ = masked[row, at - 1] != masked[row, at + 1]
    assert glued.sum() > 100 and differ[glued].any()


def _dataset(n: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    # Sample i holds 5 + 1000 i, 5 + 1000 i + 1, ...: a token says which sample it is from.
    tokens = 5 + 1000 * np.arange(n)[:, None] + np.arange(R)[None, :]
    length = np.where(np.arange(n) % 5 == 0, 8, R)  # some short donors
    return tokens.astype(np.uint32), length


def test_nsp_pairs_follow_devlin_et_al() -> None:
    N, R = 2000, 33
    data, lens = _dataset(N, R)
    calls = []

    def donor(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(idx)
        return data[idx], lens[idx]

    batcher = MaskedLMBatcher(
        special=SPECIAL, vocab_size=1000 * N + R + 5, seed=4, nsp=True, donor=donor, num_samples=N
    )
    out = _call(batcher, data, lens)
    assert len(calls) == 1 and out["next_sentence_label"].dtype == np.int64
    orig, types = _original(out), out["token_type_ids"]
    for b, label in enumerate(out["next_sentence_label"].tolist()):
        seps = np.flatnonzero(orig[b] == SEP)
        assert orig[b, 0] == CLS and len(seps) == 2
        a, second = orig[b, 1 : seps[0]], orig[b, seps[0] + 1 : seps[1]]
        n = min(lens[b], R - 4)
        assert 1 <= len(a) < n and (out["doc_index"][b, : seps[1] + 1] == 0).all()
        np.testing.assert_array_equal(types[b, : seps[0] + 1], 0)
        np.testing.assert_array_equal(types[b, seps[0] + 1 : seps[1] + 1], 1)
        assert (types[b, seps[1] + 1 :] == 0).all() and (orig[b, seps[1] + 1 :] == PAD).all()
        np.testing.assert_array_equal(a, data[b, : len(a)])
        if label == 0:  # B is A's continuation in the row
            np.testing.assert_array_equal(second, data[b, len(a) : n])
        else:  # B is the start of another sample, at most as long as the rest of the row
            other = (int(second[0]) - 5) // 1000
            assert other != b and len(second) == min(n - len(a), lens[other])
            np.testing.assert_array_equal(second, data[other, : len(second)])
    share = out["next_sentence_label"].mean()  # one sd over 2,000 rows is 0.011
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / N)


def test_nsp_rows_are_also_independent_of_the_batch() -> None:
    data, lens = _dataset(40, 17)
    batcher = MaskedLMBatcher(
        special=SPECIAL,
        vocab_size=40_100,
        seed=1,
        nsp=True,
        donor=lambda i: (data[i], lens[i]),
        num_samples=40,
    )
    both = _call(batcher, data[:8], lens[:8])
    alone = _call(batcher, data[5:6], lens[5:6], index=[5])
    for key in both:
        np.testing.assert_array_equal(both[key][5:6], alone[key])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="nsp needs a donor"):
        MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, nsp=True, num_samples=10)
    with pytest.raises(ValueError, match="nsp needs a donor"):
        MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, nsp=True, donor=lambda i: (i, i))
    with pytest.raises(ValueError, match="special lacks the ids of mask"):
        MaskedLMBatcher(
            special={k: v for k, v in SPECIAL.items() if k != "mask"}, vocab_size=V, seed=0
        )
    with pytest.raises(ValueError, match="whole_word"):
        MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, whole_word=np.zeros(5, bool))
    with pytest.raises(ValueError, match="sum to at most 1"):
        MaskedLMBatcher(special=SPECIAL, vocab_size=V, seed=0, random_token_prob=0.3)
