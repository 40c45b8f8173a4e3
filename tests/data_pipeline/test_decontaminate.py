"""Decontamination: planted eval-set overlaps are dropped (or marked), near misses kept, the
audit names the eval set and the n-gram, and a join split into many hash partitions finds the
same matches as one partition (the in-process executor's)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from crucible.data_pipeline.batches import table_numpy
from crucible.data_pipeline.decontam.eval_sets import eval_files, eval_texts
from crucible.data_pipeline.decontam.ngrams import ngram_hashes, ngram_text
from crucible.data_pipeline.decontam.overlap import join_ngrams
from crucible.data_pipeline.document_step import StepStats
from crucible.data_pipeline.executors.local import LocalData, LocalExecutor
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec, DecontaminationSpec
from crucible.errors import CrucibleError

QUESTION = (
    "Which planet in the solar system has the longest day when measured against "
    "its own orbit around the sun?"
)
ANSWER = "Venus, whose rotation is slower than its year."
PASSAGE = (
    "The committee adjourned without reaching any decision on the proposed river crossing today"
)
FILLER = "Plain words about gardening and the weather fill this ordinary training document"

# the words of QUESTION: which(0) planet in the solar system has the longest day(9) when ...
Q = QUESTION.split()
DOCS = {
    "q13": f"{FILLER}. {' '.join(Q[2:15])} {FILLER}.",  # 13 words of the question
    "q12": f"{FILLER}. {' '.join(Q[2:14])} banana {' '.join(Q[15:])} {FILLER}.",  # 12 + 4
    "shout": f"{FILLER}! " + " ".join(w.upper() + "," for w in Q[3:16]) + f" {FILLER}",
    "span": f"{FILLER} {' '.join(Q[-6:])} {' '.join(ANSWER.split()[:7])} {FILLER}",
    "text": f"{FILLER}: {PASSAGE.lower()} and then {FILLER}",
    "clean": f"{FILLER} and nothing else of note. {FILLER} again, twice over.",
}
SHOUT_GRAM = " ".join(w.lower() for w in Q[3:16])


def _spec(root: Path, **decontaminate: Any) -> DataSpec:
    """Two input parts, every filter and dedup off (only decontamination acts)."""
    inputs = root / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    names = sorted(DOCS)
    for part, chunk in enumerate((names[:3], names[3:])):
        with (inputs / f"part{part}.jsonl").open("w") as f:
            for name in chunk:
                f.write(json.dumps({"id": name, "text": DOCS[name]}) + "\n")
    evals = root / "evals"
    (evals / "txt").mkdir(parents=True, exist_ok=True)
    with (evals / "qa.jsonl").open("w") as f:
        f.write(json.dumps({"question": QUESTION, "answer": {"text": [ANSWER]}}) + "\n")
        f.write(json.dumps({"question": "too short to have a thirteen gram"}) + "\n")
    (evals / "txt" / "passage.txt").write_text(PASSAGE + "\n")
    off = {"enabled": False}
    sets = {
        "qa": {"paths": [str(evals / "qa.jsonl")], "fields": ["question", "answer.text"]},
        "passages": {"paths": [str(evals / "txt")]},
    }
    return DataSpec(
        inputs=[str(inputs)],
        language=off,
        gopher_repetition=off,
        gopher_quality=off,
        c4=off,
        fineweb=off,
        pii=off,
        dedup={"minhash": off},
        decontaminate={"eval_sets": sets, **decontaminate},
    )


def _rows(run: Path, sub: str) -> list[dict[str, Any]]:
    files = sorted((run / sub).glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_ngrams_ignore_case_and_punctuation() -> None:
    words = " ".join(f"w{chr(97 + i)}" for i in range(13))  # digits would all read as 0
    assert ngram_hashes(words, 13).size == 1
    assert ngram_hashes(" ".join(words.split()[:12]), 13).size == 0  # shorter than n: none
    shouted = ", ".join(w.upper() for w in words.split()) + "!"
    assert np.array_equal(ngram_hashes(shouted, 13), ngram_hashes(words, 13))
    assert ngram_text(shouted, 13, 0) == words


def test_eval_file_formats(tmp_path: Path) -> None:
    rec = {"q": "Who?", "a": {"choices": ["x", 3]}, "other": "ignored"}
    (tmp_path / "arr.json").write_text(json.dumps([rec, rec]))
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b'{"q": "Who?"}\nnot json\n\n[1]\n'))
    pq.write_table(pa.table({"q": ["Who?"], "a": [{"choices": ["x"]}]}), tmp_path / "t.parquet")
    stats = StepStats()
    fields = ["q", "a.choices"]
    assert list(eval_texts(str(tmp_path / "arr.json"), fields, stats)) == ["Who?\nx\n3"] * 2
    assert list(eval_texts(str(tmp_path / "z.jsonl.gz"), fields, stats)) == ["Who?"]
    assert stats.counters["bad_lines"] == 2
    assert list(eval_texts(str(tmp_path / "t.parquet"), fields, stats)) == ["Who?\nx"]


def test_join_keeps_training_rows_of_eval_hashes() -> None:
    batch = {
        "hash": np.array([5, 5, 7, 7, 9, 5], np.uint64),
        "key": np.array([-2, 10, 11, -1, 12, -1], np.int64),  # eval rows: set 1, 0, 0
    }
    out = join_ngrams(batch)
    # hash 5 is in sets 0 and 1: the first set in spec order names it; 9 has no eval row
    assert out["key"].tolist() == [10, 11]
    assert out["hash"].tolist() == [5, 7]
    assert out["set"].tolist() == [0, 0]


def test_drop_planted_overlaps(tmp_path: Path) -> None:
    stats = run_pipeline(_spec(tmp_path), tmp_path / "run", executor="local", progress=False)
    kept = {r["id"] for r in _rows(tmp_path / "run", "documents")}
    assert kept == {"q12", "clean"}
    excl = {r["id"]: r["rule"] for r in _rows(tmp_path / "run", "exclusions")}
    assert excl == {
        "q13": "decontaminate/qa",
        "shout": "decontaminate/qa",
        "span": "decontaminate/qa",  # question and answer fields joined: n-grams across them
        "text": "decontaminate/passages",
    }
    audit = {r["id"]: r for r in _rows(tmp_path / "run", "decontamination")}
    assert set(audit) == set(excl)
    assert audit["shout"]["ngram"] == SHOUT_GRAM and audit["shout"]["eval_set"] == "qa"
    assert audit["text"]["ngram"] == " ".join(PASSAGE.lower().split()[:13])
    assert all(r["dropped"] for r in audit.values())
    step = stats["steps"]["decontaminate"]
    assert step["dropped"] == {"passages": 1, "qa": 3}
    assert step["docs_in"] == len(DOCS) and step["docs_out"] == 2
    assert stats["drops"]["decontaminate/qa"] == 3
    assert stats["totals"]["docs_out"] == 2
    ev = stats["decontamination"]["eval_sets"]
    assert ev["qa"] == {"files": 1, "texts": 2, "short_texts": 1, "ngrams": 15, "bad_lines": 0}
    assert ev["passages"]["files"] == 1 and ev["passages"]["ngrams"] == 1


def test_mark_keeps_and_audits(tmp_path: Path) -> None:
    stats = run_pipeline(
        _spec(tmp_path, action="mark"), tmp_path / "run", executor="local", progress=False
    )
    assert {r["id"] for r in _rows(tmp_path / "run", "documents")} == set(DOCS)
    assert not _rows(tmp_path / "run", "exclusions")
    audit = _rows(tmp_path / "run", "decontamination")
    assert sorted(r["id"] for r in audit) == ["q13", "shout", "span", "text"]
    assert not any(r["dropped"] for r in audit)
    step = stats["steps"]["decontaminate"]
    assert step["dropped"] == {} and step["docs_out"] == len(DOCS)
    assert step["counters"] == {"contaminated_passages": 1, "contaminated_qa": 3}


class _PartitionedExecutor(LocalExecutor):
    """The in-process executor with shuffles split into hash partitions, one reduce call each
    (as the Ray executor's keyed repartition): the join must not need one partition."""

    def shuffle(
        self,
        ds: LocalData,
        keys: list[str],
        fn: Callable[[Any], Any],
        nbytes: int = 0,
        partitions: int | None = None,
        batch_format: Any = "numpy",
    ) -> LocalData:
        if not self.count(ds):
            return []
        full = table_numpy(
            pa.concat_tables([pa.table(b) if isinstance(b, dict) else b for b in ds])
        )
        n = len(full[keys[0]])
        part = np.array([hash(tuple(str(full[k][i]) for k in keys)) % 7 for i in range(n)])
        out = []
        for p in np.unique(part):
            batch = {c: v[part == p] for c, v in full.items()}
            out.append(fn(pa.table(batch) if batch_format == "pyarrow" else batch))
        return out


def test_partitioned_join_equals_one_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crucible.data_pipeline import pipeline

    one = run_pipeline(_spec(tmp_path / "a"), tmp_path / "a" / "run", "local", progress=False)
    monkeypatch.setattr(pipeline, "make_executor", lambda *_: _PartitionedExecutor())
    many = run_pipeline(_spec(tmp_path / "b"), tmp_path / "b" / "run", "local", progress=False)
    assert one["steps"] == many["steps"]
    for sub in ("documents", "decontamination"):
        a = [{**r, "source": None} for r in _rows(tmp_path / "a" / "run", sub)]
        b = [{**r, "source": None} for r in _rows(tmp_path / "b" / "run", sub)]
        assert a == b, sub


def test_spec_defaults_and_errors(tmp_path: Path) -> None:
    assert not DataSpec(inputs=["x"]).decontaminate.enabled
    with pytest.raises(ValidationError, match="eval set name"):
        DecontaminationSpec(eval_sets={"a/b": {"paths": ["x"]}})
    with pytest.raises(ValidationError):
        DecontaminationSpec(eval_sets={"a": {"paths": ["x"], "feilds": ["q"]}})
    missing = DecontaminationSpec(eval_sets={"gsm8k": {"paths": [str(tmp_path / "no.jsonl")]}})
    with pytest.raises(CrucibleError, match="eval set 'gsm8k'"):
        eval_files(missing)


@pytest.mark.slow
def test_ray_equals_local(tmp_path: Path, ray_local: Any) -> None:
    """The Ray executor (eval files indexed by Ray tasks, the join a keyed repartition into
    at least one partition per CPU) finds and audits the same documents."""
    spec = _spec(tmp_path).model_copy(update={"partition_bytes": 4096, "num_workers": 1})
    local = run_pipeline(spec, tmp_path / "local", executor="local", progress=False)
    ray = run_pipeline(spec, tmp_path / "ray", executor="ray", progress=False)
    assert local["steps"] == ray["steps"]
    assert local["decontamination"] == ray["decontamination"]
    for sub in ("documents", "exclusions", "decontamination"):
        assert _rows(tmp_path / "local", sub) == _rows(tmp_path / "ray", sub), sub


def test_missing_eval_file_fails_before_the_run_dir_is_written(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    gone = spec.decontaminate.eval_sets["qa"].model_copy(update={"paths": ["/nonexistent.jsonl"]})
    sets = {**spec.decontaminate.eval_sets, "qa": gone}
    bad = spec.model_copy(
        update={"decontaminate": spec.decontaminate.model_copy(update={"eval_sets": sets})}
    )
    with pytest.raises(CrucibleError, match="eval set 'qa'"):
        run_pipeline(bad, tmp_path / "run", executor="local", progress=False)
    assert not (tmp_path / "run" / "_work").exists()
