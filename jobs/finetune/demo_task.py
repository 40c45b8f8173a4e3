"""A fine-tuning task whose answers can be checked: "reverse these words". Used by the tests,
the benchmark and the README's example to show SFT and LoRA learning an instruction format
and a skill that the pretrained base has neither of, and a reward model learning which of
several answers is the better one (the more words in their reversed place, the better)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

PROMPT = "reverse: {}"


def reverse_words(words: Sequence[str], n: int, k: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/response records: ``reverse: w1 … wk`` → ``wk … w1``.

    Args:
        words: the vocabulary the words are drawn from.
        n: records.
        k: words per prompt.
        seed: the draw's seed.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = [rng.choice(words) for _ in range(k)]
        out.append({"prompt": PROMPT.format(" ".join(w)), "response": " ".join(reversed(w))})
    return out


def reverse_comparisons(
    words: Sequence[str], n: int, k: int, seed: int, answers: int | None = None
) -> list[dict[str, object]]:
    """``n`` comparison records: a ``reverse: …`` prompt and its answers, best first, with
    from ``k`` down to 0 words in their reversed place (the others replaced by another word),
    so the ranking is the answers' correctness.

    Args:
        words: the vocabulary (at least two words).
        n: records.
        k: words per prompt.
        seed: the draw's seed.
        answers: answers per prompt, 2 to ``k + 1`` (default ``k + 1``: every count of
            correct words; fewer spread evenly from ``k`` to 0).
    """
    K = k + 1 if answers is None else answers
    if not 2 <= K <= k + 1:
        raise ValueError(f"answers must be 2 to {k + 1}, got {K}")
    counts = [round(k - i * k / (K - 1)) for i in range(K)]
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for _ in range(n):
        w = [rng.choice(words) for _ in range(k)]
        right = list(reversed(w))
        ranked = []
        for correct in counts:
            wrong = set(rng.sample(range(k), k - correct))
            ranked.append(" ".join(
                rng.choice([x for x in words if x != t]) if i in wrong else t
                for i, t in enumerate(right)
            ))  # fmt: skip
        out.append({"prompt": PROMPT.format(" ".join(w)), "answers": ranked})
    return out


def write_task(
    out_dir: Path, words: Sequence[str], train: int, heldout: int, k: int = 3, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (prompt/response records for a data run with ``reader.chat``)
    and ``heldout.jsonl`` (prompt/reference records for ``crucible eval --prompts``), whose
    prompts never occur in the training file.

    Args:
        out_dir: where both files go.
        words: the vocabulary.
        train: training records.
        heldout: held-out prompts.
        k: words per prompt.
        seed: the draw's seed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records = reverse_words(words, train, k, seed)
    seen = {r["prompt"] for r in records}
    held: list[dict[str, str]] = []
    for r in reverse_words(words, 50 * heldout, k, seed + 1):
        if r["prompt"] not in seen and len(held) < heldout:
            seen.add(r["prompt"])
            held.append({"prompt": r["prompt"], "reference": r["response"]})
    train_path, held_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    return train_path, held_path


def main(argv: list[str] | None = None) -> None:
    """``python -m crucible.jobs.finetune.demo_task OUT_DIR``: write the task's files."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m crucible.jobs.finetune.demo_task")
    ap.add_argument("out_dir", type=Path, help="where train.jsonl and heldout.jsonl go")
    ap.add_argument("--train", type=int, default=3000, help="training records")
    ap.add_argument("--heldout", type=int, default=60, help="held-out prompts")
    ap.add_argument("--words", type=int, default=13, help="the first N English sample words")
    ap.add_argument(
        "--comparisons", type=int, default=3000,
        help="ranked-answer records for a reward model (comparisons.jsonl; 0: none)",
    )  # fmt: skip
    ap.add_argument(
        "--answers", type=int, default=2,
        help="answers per comparison (2-4; 4 need rows of about 180 tokens)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    sample = Path(__file__).resolve().parents[2] / "data_pipeline" / "sample_words" / "en.txt"
    words = sample.read_text().split()[: args.words]
    for p in write_task(args.out_dir, words, args.train, args.heldout):
        print(p)
    if args.comparisons:
        path = args.out_dir / "comparisons.jsonl"
        records = reverse_comparisons(words, args.comparisons, 3, seed=2, answers=args.answers)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(path)


if __name__ == "__main__":
    main()
