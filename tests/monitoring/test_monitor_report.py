"""`crucible monitor --once` and `crucible report` on a synthetic killed-and-resumed run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import typer
from typer.testing import CliRunner

from crucible.jobs.cli.monitor import monitor_cmd, report_cmd
from crucible.monitoring.ledger import LedgerWriter
from crucible.monitoring.status import read_records, run_status

T0 = 1_700_000_000.0


def make_run(run: Path) -> Path:
    """Attempt 1: steps 1-35 (checkpoints 10, 20, 30), killed; attempt 2 resumes at 30 → 60."""
    run.mkdir()
    (run / "spec.resolved.yaml").write_text(
        "kind: train\nname: demo-run\ntrain:\n  max_steps: 100\n  num_workers: 2\n"
    )
    lines, t = [], T0
    for attempt, steps, resumed in ((1, range(1, 36), 0), (2, range(31, 61), 30)):
        w = LedgerWriter(run, 2, resumed_from=resumed, start_time=t)
        t += 20
        w.startup_done(t)
        if resumed:
            lines.append({"kind": "resume", "step": resumed, "world_size": 2, "load_seconds": 2})
        for n in steps:
            dt = 1.0 if attempt == 1 else 0.8
            loss = 2 + 8 * math.exp(-n / 15)
            rec = {"kind": "step", "step": n, "loss": loss, "lr": 3e-4, "grad_norm": 1.0,
                   "tokens": 8192, "step_seconds": dt, "tokens_per_s": 8192 / dt,
                   "mfu": 0.4 if attempt == 1 else 0.5, "time": t + dt, "extra": [1, 2]}  # fmt: skip
            if n % 20 == 0:
                rec["heldout_loss"] = loss + 0.2
            w.step(n, t, t + dt, 0.05)
            t += dt
            lines.append(rec)
            if n % 10 == 0 and (attempt == 2 or n <= 30):
                w.checkpoint(n, t, t + 3)
                t += 3
                lines.append({"kind": "checkpoint", "step": n, "bytes": 10**8, "save_seconds": 3})
        w.close()
        t += 40  # dead time before the restart
    text = "\n".join(json.dumps(x) for x in lines) + "\n{torn line\n"
    (run / "metrics.jsonl").write_text(text)
    return run


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("monitor")(monitor_cmd)
    a.command("report")(report_cmd)
    return a


def test_records_are_read_tolerantly(tmp_path: Path) -> None:
    recs = read_records(make_run(tmp_path / "r"))
    assert [r["step"] for r in recs.steps] == list(range(1, 61))  # redone steps replaced
    assert recs.steps[32]["step_seconds"] == 0.8  # step 33 from attempt 2
    assert recs.corrupt_lines == 1 and len(recs.resumes) == 1
    assert [c["step"] for c in recs.checkpoints] == [10, 20, 30, 40, 50, 60]


def test_status(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r")
    st = run_status(run, now=T0 + 10**6)
    assert st.step == 60 and st.total_steps == 100 and st.progress == pytest.approx(0.6)
    assert st.tokens_per_s == pytest.approx(8192 / 0.8)
    assert st.eta_s == pytest.approx(40 * 0.8)
    assert st.mfu == 0.5 and st.restarts == 1 and st.last_checkpoint_step == 60
    assert st.ledger is not None and st.ledger.seconds["lost"] == pytest.approx(5 * 0.95 * 2)
    assert st.gpu_hours_projected == pytest.approx(st.ledger.gpu_hours / 0.6)


def test_monitor_once_prints_a_frame(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r")
    res = CliRunner().invoke(app(), ["monitor", str(run), "--once",
                                     "--prometheus", "http://127.0.0.1:9"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.output
    assert "step 60 / 100" in out and "60.0%" in out and "ETA 32s" in out
    assert "10,240" in out  # tokens/s
    assert "50.0 %" in out  # MFU
    assert "goodput" in out and "step 60" in out
    assert "Prometheus not reachable" in out and "demo-run" in out


def test_report_writes_charts_and_summary(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r")
    res = CliRunner().invoke(app(), ["report", str(run), "--price", "2.5"])
    assert res.exit_code == 0, res.output
    out = run / "report"
    for name in ("loss.png", "throughput.png", "mfu.png", "gpu_hours.png"):
        img = mpimg.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
    md = (out / "report.md").read_text()
    assert "| lost |" in md and "Goodput" in md and "$2.5/GPU-hour" in md
    assert "![gpu_hours](gpu_hours.png)" in md and "1 unreadable metrics line" in md


def test_unknown_run_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app(), ["monitor", str(tmp_path / "nope"), "--once"])
    assert res.exit_code != 0 and "no run" in str(res.exception)
