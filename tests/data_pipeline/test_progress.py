"""Progress: one display per stage (a bar on a terminal, one-line updates in a log), quiet
third-party logging unless --verbose (which reaches the job on the cluster), and a summary
that includes the shards."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from crucible.data_pipeline.executors.ray import quiet_third_party
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.progress import Progress
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stats_report import format_stats

SHARDS = {"seq_len": 32, "rows_per_shard": 100, "tokenizer": {"train": {"vocab_size": 320}}}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_periodic_one_line_updates_with_rates() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("filter", total=4, stream=out, clock=clock)
    p.skip(1, docs=100, nbytes=10**6)  # done before: counts towards parts, not rates
    clock.t = 1.0
    p.update(1, docs=300, nbytes=3 * 10**6, postfix="read=300")
    assert out.getvalue() == "[filter] started: 4 parts\n"  # not yet every_s
    clock.t = p.every_s
    p.update(1, docs=100 + 30 * 200, nbytes=10**6 + 30 * 2 * 10**6)
    clock.t = p.every_s + 10
    p.update(1)  # within every_s of the last line: nothing
    clock.t = 2 * p.every_s
    p.close("all good")
    lines = out.getvalue().splitlines()
    assert lines[1] == "[filter] 3/4 parts  200 docs/s  2.0 MB/s"
    assert lines[2].startswith("[filter] done in 60.0 s  4/4 parts  100 docs/s  1.0 MB/s")
    assert lines[2].endswith("all good") and len(lines) == 3
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_a_bar() -> None:
    out = Terminal()
    with Progress("finalize", total=2, stream=out) as p:
        p.update(1, docs=10, nbytes=1000)
        p.update(1, docs=20, nbytes=2000)
    text = out.getvalue()
    assert "\r" in text and "finalize" in text and "2/2" in text
    assert "docs/s" in text and "MB/s" in text


def test_disabled_progress_writes_nothing() -> None:
    out = Terminal()
    with Progress("filter", total=2, stream=out, enabled=False) as p:
        p.update(2, docs=5)
    Progress("exact", stream=io.StringIO(), enabled=False).close("x")
    assert out.getvalue() == ""


def test_every_stage_has_its_display_and_the_summary_names_the_shards(
    corpus: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    spec = DataSpec(inputs=[str(corpus["dir"])], shards=SHARDS)
    run_pipeline(spec, run, executor="local", progress=True)
    err = capsys.readouterr().err
    for stage in ("filter", "exact", "minhash", "finalize", "shards"):
        (done,) = [x for x in err.splitlines() if x.startswith(f"[{stage}] done in ")]
        assert "docs/s" in done, done
    assert "MB/s" in next(x for x in err.splitlines() if x.startswith("[filter] done"))
    shards_line = next(x for x in err.splitlines() if x.startswith("[shards] done"))
    assert "rows" in shards_line and "tokens" in shards_line and str(run / "shards") in shards_line
    report = format_stats(run)
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert f"shards in {run / 'shards'}" in report
    assert f"{train['rows']:,} rows" in report and f"{train['tokens']:,} tokens" in report
    assert f"{len(train['shards'])} files" in report


def test_third_party_logging_is_quiet_unless_verbose() -> None:
    pytest.importorskip("ray")
    from ray.data import DataContext

    ctx = DataContext.get_current()
    log = logging.getLogger("ray.data")
    before = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, log.level)
    try:
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = True
        log.setLevel(logging.INFO)
        quiet_third_party(verbose=True)
        assert ctx.enable_progress_bars and log.level == logging.INFO
        quiet_third_party()
        assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
        assert not ctx.print_on_execution_start
        assert log.level == logging.WARNING
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = before[:2]
        log.setLevel(before[2])


def data_spec_file(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    spec = {
        "kind": "data",
        "name": "web",
        "cluster": {"storage": str(tmp_path / "runs")},
        "data": {"inputs": [str(tmp_path / "in")]},
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class FakeClient:
    def __init__(self) -> None:
        self.entrypoints: list[str] = []

    def list(self) -> list:
        return []

    def python(self) -> str:
        return "python"

    def submit(self, entrypoint: str, **kw: Any) -> str:
        self.entrypoints.append(entrypoint)
        return kw["submission_id"]


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_reaches_the_job_on_the_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbose: bool
) -> None:
    from crucible.jobs import entry, submit
    from crucible.jobs.cli.data import app

    client = FakeClient()
    monkeypatch.setattr(submit.JobsClient, "for_cluster", staticmethod(lambda c: client))
    args = ["run", str(data_spec_file(tmp_path)), "--detach", *(["--verbose"] * verbose)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    (cmd,) = client.entrypoints
    assert cmd.endswith(" --verbose") == verbose

    seen: dict[str, Any] = {}

    def fake_run_pipeline(spec: Any, run_dir: Any, **kw: Any) -> dict:
        seen.update(kw)
        return {}

    import crucible.data_pipeline.pipeline as pipeline
    import crucible.data_pipeline.stats_report as stats_report

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    monkeypatch.setattr(stats_report, "format_stats", lambda d: "")
    monkeypatch.setattr(sys, "argv", ["entry", *cmd.split()[3:]])
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 0
    assert seen == {"executor": "ray", "verbose": verbose}


def test_verbose_reaches_a_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crucible.jobs.cli.data import app

    seen: dict[str, Any] = {}

    def fake_run_pipeline(spec: Any, run_dir: Any, **kw: Any) -> dict:
        seen.update(kw)
        return {}

    import crucible.data_pipeline.pipeline as pipeline
    import crucible.data_pipeline.stats_report as stats_report

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    monkeypatch.setattr(stats_report, "format_stats", lambda d: "")
    r = CliRunner().invoke(app, ["run", str(data_spec_file(tmp_path)), "--local", "--verbose"])
    assert r.exit_code == 0, r.output
    assert seen == {"executor": "local", "verbose": True}


def test_the_decontaminate_stage_has_its_display(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = " ".join(f"word{i} alpha beta gamma" for i in range(40))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "a", "text": text}) + "\n")
    (tmp_path / "eval.txt").write_text(text + "\n")
    off = {"enabled": False}
    spec = DataSpec.model_validate(
        {
            "inputs": [str(tmp_path / "in")],
            **{k: off for k in ("language", "gopher_repetition", "gopher_quality", "c4")},
            **{k: off for k in ("fineweb", "pii")},
            "decontaminate": {"eval_sets": {"ev": {"paths": [str(tmp_path / "eval.txt")]}}},
        }
    )
    run_pipeline(spec, tmp_path / "run", executor="local", progress=True)
    err = capsys.readouterr().err.splitlines()
    (done,) = [x for x in err if x.startswith("[decontaminate] done in ")]
    assert "eval-set n-gram matches" in done and "docs/s" in done
