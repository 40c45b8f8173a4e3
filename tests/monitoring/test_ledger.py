"""The GPU-hours ledger: attribution across kills and resumes, corrupt lines, export."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from crucible.monitoring.ledger import LEDGER_DIR, LedgerCollector, LedgerWriter, account


def write_attempt(run: Path, devices: int, start: float, resumed_from: int, steps: range,
                  ckpt_every: int, end: str | None, step_s: float = 1.0, wait_s: float = 0.1,
                  ckpt_s: float = 2.0, startup_s: float = 10.0) -> float:  # fmt: skip
    """A synthetic attempt with exact times; returns its last timestamp."""
    w = LedgerWriter(run, devices, resumed_from=resumed_from, start_time=start)
    t = start + startup_s
    w.startup_done(t)
    for n in steps:
        w.step(n, t, t + step_s, data_wait_seconds=wait_s)
        t += step_s
        if n % ckpt_every == 0:
            w.checkpoint(n, t, t + ckpt_s, committed=True)
            t += ckpt_s
    if end:
        w._append({"kind": "end", "t": t, "status": end}, sync=True)
    w.close()
    return t


def test_killed_and_resumed_run_attributes_every_device_second(tmp_path: Path) -> None:
    # Attempt 1: steps 1-25, checkpoints at 10 and 20, then dies (no end record).
    end1 = write_attempt(tmp_path, 4, 1000.0, 0, range(1, 26), 10, end=None)
    # Attempt 2 starts 30 s later from step 20 and finishes at 30.
    end2 = write_attempt(tmp_path, 4, end1 + 30.0, 20, range(21, 31), 10, end="finished")
    s = account(tmp_path, price_per_device_hour=2.0, watts_per_device=700.0)
    sec = s.seconds
    assert s.attempts == 2 and s.finished and not s.running and s.corrupt_lines == 0
    assert sec["productive"] == pytest.approx((20 + 10) * 0.9 * 4)
    assert sec["lost"] == pytest.approx(5 * 0.9 * 4)  # steps 21-25 of attempt 1
    assert sec["data_wait"] == pytest.approx(35 * 0.1 * 4)
    assert sec["checkpoint"] == pytest.approx(3 * 2.0 * 4)
    assert sec["startup"] == pytest.approx((10 + 30 + 10) * 4)  # both start-ups + restart gap
    assert sec["uncommitted"] == 0 and sec["idle"] == pytest.approx(0, abs=1e-6)
    assert s.total_seconds == pytest.approx((end2 - 1000.0) * 4)
    assert s.goodput == pytest.approx(sec["productive"] / s.total_seconds)
    assert s.cost == pytest.approx(s.total_seconds / 3600 * 2.0)
    assert s.energy_kwh == pytest.approx(s.total_seconds * 700 / 3.6e6)
    assert sum(x for _, _, x in s.timeline) == pytest.approx(s.total_seconds)


def test_resume_from_an_older_checkpoint_loses_the_newer_work(tmp_path: Path) -> None:
    # Checkpoint 20 turned out corrupt: attempt 2 resumes from 10; steps 11-25 are lost.
    end1 = write_attempt(tmp_path, 2, 0.0, 0, range(1, 26), 10, end=None)
    write_attempt(tmp_path, 2, end1 + 5, 10, range(11, 21), 10, end="finished")
    s = account(tmp_path)
    assert s.seconds["lost"] == pytest.approx(15 * 0.9 * 2)
    assert s.seconds["productive"] == pytest.approx(20 * 0.9 * 2)


def test_a_commit_the_dead_attempt_never_recorded_is_its_work_not_lost(tmp_path: Path) -> None:
    # Attempt 1 records checkpoint 10; checkpoint 20 is committed in the background but the
    # attempt dies before recording it. Attempt 2 resumes from 20: steps 11-20 are attempt
    # 1's productive work, only 21-25 are lost.
    w = LedgerWriter(tmp_path, 2, resumed_from=0, start_time=0.0)
    w.startup_done(10.0)
    t = 10.0
    for n in range(1, 26):
        w.step(n, t, t + 1.0, data_wait_seconds=0.1)
        t += 1.0
        if n == 10:
            w.checkpoint(n, t, t + 2.0, committed=True)
            t += 2.0
    w.close()
    write_attempt(tmp_path, 2, t + 5, 20, range(21, 31), 10, end="finished")
    s = account(tmp_path)
    assert s.seconds["lost"] == pytest.approx(5 * 0.9 * 2)
    assert s.seconds["productive"] == pytest.approx(30 * 0.9 * 2)


def test_live_attempt_has_uncommitted_work_until_it_goes_stale(tmp_path: Path) -> None:
    end = write_attempt(tmp_path, 1, 0.0, 0, range(1, 8), 5, end=None)
    live = account(tmp_path, now=end + 1)
    assert live.running and live.seconds["uncommitted"] == pytest.approx(2 * 0.9)
    assert live.seconds["lost"] == 0
    dead = account(tmp_path, now=end + 3600)
    assert not dead.running and dead.seconds["lost"] == pytest.approx(2 * 0.9)
    assert dead.seconds["uncommitted"] == 0


def test_corrupt_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    write_attempt(tmp_path, 1, 0.0, 0, range(1, 6), 5, end="finished")
    path = tmp_path / LEDGER_DIR / "attempt-1.jsonl"
    with path.open("a") as f:
        f.write('{"kind": "step", "t0": 1\n')  # torn write of a killed process
        f.write("\x00\x00garbage\n")
        f.write(json.dumps({"kind": "step", "t0": 5, "t1": 4, "devices": 1, "step": 9}) + "\n")
    s = account(tmp_path)
    assert s.corrupt_lines == 3
    assert s.seconds["productive"] == pytest.approx(5 * 0.9)


def test_empty_or_missing_ledger(tmp_path: Path) -> None:
    s = account(tmp_path)
    assert s.attempts == 0 and s.total_seconds == 0 and math.isnan(s.goodput)


def test_collector_exports_phases(tmp_path: Path) -> None:
    write_attempt(tmp_path, 2, 0.0, 0, range(1, 8), 5, end=None)
    reg = CollectorRegistry()
    reg.register(LedgerCollector(tmp_path))
    get = reg.get_sample_value
    assert get("crucible_gpu_seconds_total", {"phase": "productive"}) == pytest.approx(5 * 0.9 * 2)
    assert get("crucible_gpu_seconds_total", {"phase": "startup"}) == pytest.approx(20)
    assert get("crucible_gpu_seconds_total", {"phase": "uncommitted"}) is None
    assert get("crucible_gpu_uncommitted_seconds") == pytest.approx(2 * 0.9 * 2)
    write_attempt(tmp_path, 2, 100.0, 5, range(6, 11), 5, end="finished")
    assert get("crucible_gpu_seconds_total", {"phase": "lost"}) == pytest.approx(2 * 0.9 * 2)


def test_unwritable_ledger_never_raises(tmp_path: Path) -> None:
    (tmp_path / LEDGER_DIR).write_text("not a directory")
    w = LedgerWriter(tmp_path, 8)
    w.startup_done()
    w.step(1, 0.0, 1.0)
    w.end()


WORKER = """
import sys, time
from pathlib import Path
from crucible.monitoring.ledger import LedgerWriter
run, start, resumed, last = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
time.sleep(0.2)  # start-up work (imports done): counted from process start
w = LedgerWriter(run, devices=2, resumed_from=resumed)
w.startup_done()
for n in range(start, last + 1):
    t0 = time.time(); time.sleep(0.01); wait = time.time() - t0; time.sleep(0.03)
    w.step(n, t0, time.time(), data_wait_seconds=wait)
    if n % 5 == 0:
        t0 = time.time(); time.sleep(0.05); w.checkpoint(n, t0, time.time())
w.end("finished")
"""


def test_real_processes_killed_and_resumed_add_up_to_wall_time(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    t_start = time.time()
    first = subprocess.Popen([sys.executable, str(script), str(tmp_path), "1", "0", "1000"])
    ledger = tmp_path / LEDGER_DIR / "attempt-1.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once it has passed checkpoint 10
        if ledger.exists() and '"step": 13' in ledger.read_text():
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    committed = max(json.loads(x)["step"] for x in ledger.read_text().splitlines()
                    if '"checkpoint"' in x)  # fmt: skip
    second = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(committed + 1), str(committed), "20"],
        check=True,
    )
    assert second.returncode == 0
    t_end = time.time()
    s = account(tmp_path)
    assert s.finished and s.attempts == 2
    # Every device-second of the ledger's span is in exactly one phase; the span lies within
    # what we saw from outside and holds at least the steps' sleeps.
    assert s.total_seconds == pytest.approx(s.wall_seconds * 2, rel=1e-6)
    assert 20 * 0.04 < s.wall_seconds <= t_end - t_start
    assert s.seconds["lost"] > 0  # steps after the last checkpoint of the killed attempt
    assert s.seconds["productive"] >= 20 * 0.03 * 2
    assert s.seconds["startup"] > 2 * 0.2 * 2
