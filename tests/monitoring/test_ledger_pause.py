"""A user's pause between jobs is never billed; a crash-restart inside a job is; badput by cause."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from crucible.cluster.storage import JsonlLog, location
from crucible.monitoring.ledger import CAUSES, LEDGER_DIR, LedgerCollector, LedgerWriter, account
from crucible.monitoring.report import write_report

DAY = 86400.0


def write_attempt(run: Path, start: float, resumed_from: int, steps: range,
                  end: str | None = None, load_s: float = 0.0, hang_s: float = 0.0) -> float:  # fmt: skip
    """Two devices; 10 s start-up (``load_s`` of it loading), 1 s steps with 0.1 s data wait,
    a 2 s checkpoint every 10 steps, then ``hang_s`` of hang; returns the last timestamp."""
    w = LedgerWriter(run, 2, resumed_from=resumed_from, start_time=start)
    if load_s:
        w.interval("checkpoint_load", start + 5, start + 5 + load_s, step=resumed_from)
    t = start + 10
    w.startup_done(t)
    for n in steps:
        w.step(n, t, t + 1, data_wait_seconds=0.1)
        t += 1
        if n % 10 == 0:
            w.checkpoint(n, t, t + 2)
            t += 2
    if hang_s:
        w.interval("hang", t, t + hang_s)
        t += hang_s
    if end:
        w._append({"kind": "end", "t": t, "status": end}, sync=True)
    w.close()
    return t


def submitted(run: Path, t: float) -> None:
    """What ``crucible train``/``resume`` appends at each submission."""
    log = JsonlLog(location(run) / "jobs.jsonl")
    log.append({"job": f"job-{t:.0f}", "submitted_at": t}, sync=True)
    log.close()


def in_attempt_seconds(*spans: tuple[float, float]) -> float:
    return sum(t1 - t0 for t0, t1 in spans) * 2


def test_a_day_long_pause_between_jobs_adds_no_gpu_seconds(tmp_path: Path) -> None:
    submitted(tmp_path, 990.0)
    # The user stops the job after step 20 (killed: no end record), resumes a day later.
    end1 = write_attempt(tmp_path, 1000.0, 0, range(1, 21))
    submitted(tmp_path, end1 + DAY)
    end2 = write_attempt(tmp_path, end1 + DAY + 30, 20, range(21, 31), end="finished")
    s = account(tmp_path)
    assert s.attempts == 2 and s.finished and s.pauses == 1
    assert s.paused_seconds == pytest.approx(DAY)
    assert s.queued_seconds == pytest.approx(10 + 30)  # both submissions to their attempts
    billed = in_attempt_seconds((1000.0, end1), (end1 + DAY + 30, end2))
    assert s.total_seconds == pytest.approx(billed)
    assert s.seconds["startup"] == pytest.approx(2 * 10 * 2)  # the two start-ups only
    assert s.causes["restart"] == 0 and s.seconds["lost"] == 0
    assert s.goodput == pytest.approx(30 * 0.9 * 2 / billed)
    assert s.wall_seconds == pytest.approx(end2 - 1000.0)  # the span, pause included
    reg = CollectorRegistry()
    reg.register(LedgerCollector(tmp_path))
    get = reg.get_sample_value
    assert get("crucible_run_paused_seconds") == pytest.approx(DAY)
    assert get("crucible_gpu_badput_seconds_total", {"cause": "restart"}) == 0
    assert get("crucible_gpu_badput_seconds_total", {"cause": "startup"}) == pytest.approx(40)


def test_a_stopped_attempt_without_a_jobs_log_is_paused_until_the_next(tmp_path: Path) -> None:
    end1 = write_attempt(tmp_path, 0.0, 0, range(1, 11), end="stopped")
    end2 = write_attempt(tmp_path, end1 + DAY, 10, range(11, 21), end="finished")
    s = account(tmp_path)
    assert s.paused_seconds == pytest.approx(DAY) and s.queued_seconds == 0
    assert s.total_seconds == pytest.approx(in_attempt_seconds((0.0, end1), (end1 + DAY, end2)))


def test_a_crash_restart_inside_one_job_is_still_billed(tmp_path: Path) -> None:
    submitted(tmp_path, 0.0)
    end1 = write_attempt(tmp_path, 0.0, 0, range(1, 16), end="failed")
    end2 = write_attempt(tmp_path, end1 + 30, 10, range(11, 21), end="finished")
    s = account(tmp_path)
    assert s.pauses == 0 and s.paused_seconds == 0
    assert s.causes["restart"] == pytest.approx(30 * 2)
    assert s.seconds["startup"] == pytest.approx((10 + 30 + 10) * 2)  # phase as before
    assert s.seconds["lost"] == pytest.approx(5 * 0.9 * 2)
    assert s.total_seconds == pytest.approx((end2 - 0.0) * 2)


def test_badput_by_cause_adds_up(tmp_path: Path) -> None:
    end1 = write_attempt(tmp_path, 0.0, 0, range(1, 16), hang_s=120.0)  # watchdog exit
    write_attempt(tmp_path, end1 + 20, 10, range(11, 21), end="finished", load_s=4.0)
    s = account(tmp_path)
    c = s.causes
    assert set(c) == set(CAUSES)
    assert sum(c.values()) == pytest.approx(s.total_seconds)
    assert c["productive"] == pytest.approx(s.seconds["productive"])
    assert c["hang"] == pytest.approx(120 * 2)
    assert c["checkpoint_load"] == pytest.approx(4 * 2)
    assert c["startup"] == pytest.approx((10 + 6) * 2)
    assert c["restart"] == pytest.approx(20 * 2)
    assert s.seconds["startup"] == pytest.approx(c["startup"] + c["checkpoint_load"]
                                                 + c["restart"] + c["hang"])  # fmt: skip
    assert c["checkpoint_save"] == pytest.approx(s.seconds["checkpoint"])
    assert c["data_wait"] == pytest.approx(25 * 0.1 * 2) and c["lost"] > 0
    assert sum(s.badput.values()) == pytest.approx(s.total_seconds - c["productive"])


def test_report_lists_goodput_every_cause_and_the_pause(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.resolved.yaml").write_text("kind: train\nname: paused\n")
    submitted(run, 0.0)
    end1 = write_attempt(run, 0.0, 0, range(1, 21), hang_s=5.0)
    submitted(run, end1 + DAY)
    write_attempt(run, end1 + DAY + 1, 20, range(21, 31), end="finished")
    assert (run / LEDGER_DIR / "attempt-2.jsonl").exists()
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "## Goodput and badput" in md and "Goodput" in md
    names = ("productive (goodput)", "start-up", "restart", "hang", "checkpoint load",
             "checkpoint save", "lost (rolled back)", "data wait", "evaluation", "idle")  # fmt: skip
    for name in names:
        assert f"| {name} |" in md, name
    assert "Paused 1d 00h over 1 pause(s)" in md
