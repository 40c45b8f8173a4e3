"""Turn packed rows into masked-language-model samples, as BERT is pre-trained (Devlin et al.
2018): ``[CLS] text [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` for next-sentence prediction), 15% of
the text's tokens chosen for prediction, of which 80% become ``[MASK]``, 10% a random token and
10% stay as they are. Pure numpy; every draw for a row comes from a generator seeded by
``(seed, sample index, epoch)``, so a sample's result depends on nothing else in its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

IGNORE = -100  # the label torch's cross-entropy skips
BERT_KEYS = ("pad", "unk", "cls", "sep", "mask")
Pair = tuple[np.ndarray, np.ndarray | None]  # segment A, and B when laying out sentence pairs


class MaskedLMBatcher:
    """Lay out, mask and label a batch of packed rows for BERT-style pre-training.

    Args:
        special: Ids of BERT's special tokens, as :func:`~.tokenizer.bert_special_ids` gives.
        vocab_size: Number of token ids; random replacements are drawn from it.
        seed: Seed of every random choice (with each row's sample index).
        mask_prob: Fraction of a row's text tokens chosen for prediction.
        mask_token_prob: Of the chosen, the fraction replaced by ``[MASK]``.
        random_token_prob: Of the chosen, the fraction replaced by a random non-special id.
        whole_word: Bool per id, True for word continuations (:func:`~.tokenizer.continuation_mask`):
            choose whole words only. None chooses single tokens.
        nsp: Lay rows out as sentence pairs and label whether B follows A.
        donor: ``donor(indices) -> (tokens [k, R], length [k])``: other samples of the split,
            where NotNext pairs take B from. Required with ``nsp``.
        num_samples: Number of samples in the split (donors are drawn from it). Required with
            ``nsp``.

    Raises:
        ValueError: A special id is missing, a probability is out of range, ``whole_word`` does
            not match the vocabulary, or ``nsp`` lacks ``donor`` or ``num_samples``.
    """

    def __init__(
        self,
        *,
        special: dict[str, int],
        vocab_size: int,
        seed: int,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        whole_word: np.ndarray | None = None,
        nsp: bool = False,
        donor: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
        num_samples: int | None = None,
    ) -> None:
        missing = [k for k in BERT_KEYS if k not in special]
        if missing:
            raise ValueError(f"special lacks the ids of {', '.join(missing)}")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if min(mask_token_prob, random_token_prob) < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError(
                "mask_token_prob and random_token_prob must be non-negative and sum to at most 1"
            )
        if not all(0 <= i < vocab_size for i in special.values()):
            raise ValueError(f"special ids must lie in range(vocab_size {vocab_size})")
        if whole_word is not None and whole_word.shape != (vocab_size,):
            raise ValueError(f"whole_word must be a bool array of length vocab_size {vocab_size}")
        if nsp and (donor is None or num_samples is None or num_samples < 2):
            raise ValueError("nsp needs a donor and num_samples of at least 2 to draw B from")
        self.special = dict(special)
        self.seed = seed
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob
        self.whole_word = None if whole_word is None else whole_word.astype(bool)
        self.nsp = nsp
        self.donor = donor
        self.num_samples = num_samples
        self._special_ids = np.unique(np.fromiter(special.values(), np.int64))
        self._num_random = vocab_size - len(self._special_ids)
        # special id k (sorted) has ``_gaps[k]`` non-special ids below it
        self._gaps = self._special_ids - np.arange(len(self._special_ids))

    def __call__(
        self,
        tokens: np.ndarray,
        length: np.ndarray,
        sample_index: np.ndarray,
        epoch: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Mask a batch of packed rows.

        Args:
            tokens: ``[B, R]`` packed rows; only the first ``length[b]`` tokens of row b are real.
            length: ``[B]`` real tokens per row.
            sample_index: ``[B]`` each row's sample index in its split (seeds its draws).
            epoch: ``[B]`` the epoch each row is read in (seeds its draws too: a sample seen
                again is masked anew, RoBERTa's dynamic masking); default all 0.

        Returns:
            With ``T = R - 1``: ``input_ids``, ``labels`` (the original id where a token was
            chosen, -100 elsewhere) and ``token_type_ids``, all ``[B, T]`` int64; ``doc_index``
            ``[B, T]`` int32 (0 on tokens, -1 on padding); with ``nsp``,
            ``next_sentence_label`` ``[B]`` int64 (0: B follows A, 1: B is from another sample).
        """
        B, R = tokens.shape
        T = R - 1
        frame = 3 if self.nsp else 2  # [CLS] and one [SEP] per segment
        if frame > T:
            raise ValueError(f"rows of {R} tokens are too short for [CLS] and [SEP]")
        epochs = np.zeros(B, np.int64) if epoch is None else epoch
        rngs = [
            np.random.default_rng([self.seed, int(i), int(e)])
            for i, e in zip(sample_index, epochs, strict=True)
        ]
        contents = [tokens[b, : int(length[b])].astype(np.int64) for b in range(B)]
        pairs: list[Pair] = [(c[: T - 2], None) for c in contents]
        nsp_label = None
        if self.nsp:
            pairs, nsp_label = self._pairs(contents, rngs, sample_index, T)
        out = {
            "input_ids": np.full((B, T), self.special["pad"], np.int64),
            "labels": np.full((B, T), IGNORE, np.int64),
            "token_type_ids": np.zeros((B, T), np.int64),
            "doc_index": np.full((B, T), -1, np.int32),
        }
        for b, (a, second) in enumerate(pairs):
            ids, is_text, types = self._layout(a, second)
            n = len(ids)
            labels = self._mask(ids, is_text, rngs[b])
            out["input_ids"][b, :n] = ids
            out["labels"][b, :n] = labels
            out["token_type_ids"][b, :n] = types
            out["doc_index"][b, :n] = 0
        if nsp_label is not None:
            out["next_sentence_label"] = nsp_label
        return out

    def _pairs(
        self,
        contents: list[np.ndarray],
        rngs: list[np.random.Generator],
        sample_index: np.ndarray,
        T: int,
    ) -> tuple[list[Pair], np.ndarray]:
        # Every row's split point, coin and donor are drawn first, so that one donor call
        # serves the batch; each row's generator is still used in the same order.
        assert self.donor is not None and self.num_samples is not None
        # (A, B unless it comes from a donor, tokens B may have, donor index or -1)
        plan: list[tuple[np.ndarray, np.ndarray | None, int, int]] = []
        for content, rng, own in zip(contents, rngs, sample_index, strict=True):
            n = min(len(content), T - 3)
            if n < 2:  # nothing to split: A is the whole text, B is empty
                plan.append((content[:n], content[:0], 0, -1))
                continue
            p = int(rng.integers(1, n))
            if rng.random() < 0.5:
                plan.append((content[:p], content[p:n], n - p, -1))
                continue
            other = int(own)
            while other == int(own):
                other = int(rng.integers(self.num_samples))
            plan.append((content[:p], None, n - p, other))
        wanted = np.array([d for *_, d in plan if d >= 0], np.int64)
        donors = iter(zip(*self.donor(wanted), strict=True)) if len(wanted) else iter(())
        pairs: list[Pair] = []
        label = np.zeros(len(plan), np.int64)
        for b, (a, second, room, d) in enumerate(plan):
            if d >= 0:
                row, n = next(donors)
                second, label[b] = row[: min(int(n), room)].astype(np.int64), 1
            pairs.append((a, second))
        return pairs, label

    def _layout(
        self, a: np.ndarray, second: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # ``[CLS] a [SEP]`` and, for a pair, ``second [SEP]`` with token type 1.
        cls, sep = np.array([self.special["cls"]]), np.array([self.special["sep"]])
        frame = np.zeros(1, bool)
        parts = [cls, a, sep]
        text = [frame, np.ones(len(a), bool), frame]
        types = [np.zeros(len(a) + 2, np.int64)]
        if second is not None:
            parts += [second, sep]
            text += [np.ones(len(second), bool), frame]
            types.append(np.ones(len(second) + 1, np.int64))
        ids = np.concatenate(parts).astype(np.int64)
        is_text = np.concatenate(text) & ~np.isin(ids, self._special_ids)
        return ids, is_text, np.concatenate(types)

    def _mask(self, ids: np.ndarray, is_text: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Choose positions among the text tokens, replace them in ``ids``, return the labels.
        labels = np.full(len(ids), IGNORE, np.int64)
        candidates = np.flatnonzero(is_text)
        if len(candidates) == 0:
            return labels
        target = max(1, round(self.mask_prob * len(candidates)))
        if self.whole_word is None:
            chosen = np.sort(rng.choice(candidates, size=target, replace=False))
        else:
            chosen = self._whole_words(ids, candidates, target, rng)
        labels[chosen] = ids[chosen]
        u = rng.random(len(chosen))
        random_ids = self._non_special(rng.integers(self._num_random, size=len(chosen)))
        to_mask = u < self.mask_token_prob
        to_random = ~to_mask & (u < self.mask_token_prob + self.random_token_prob)
        ids[chosen[to_mask]] = self.special["mask"]
        ids[chosen[to_random]] = random_ids[to_random]
        return labels

    def _non_special(self, r: np.ndarray) -> np.ndarray:
        # The r-th id that is not special, without a table as long as the vocabulary: r moves
        # up by one for every special id with at most r non-special ids below it.
        return r + np.searchsorted(self._gaps, r, side="right")

    def _whole_words(
        self, ids: np.ndarray, candidates: np.ndarray, target: int, rng: np.random.Generator
    ) -> np.ndarray:
        # A continuation joins the word of the candidate right before it. Words are taken in
        # random order while they fit in ``target`` (Google's create_pretraining_data.py).
        assert self.whole_word is not None
        words: list[list[int]] = []
        for pos in candidates.tolist():
            if words and words[-1][-1] == pos - 1 and self.whole_word[ids[pos]]:
                words[-1].append(pos)
            else:
                words.append([pos])
        chosen: list[int] = []
        for w in rng.permutation(len(words)).tolist():
            if len(chosen) >= target:
                break
            if len(chosen) + len(words[w]) <= target:
                chosen += words[w]
        return np.array(sorted(chosen), np.int64)
