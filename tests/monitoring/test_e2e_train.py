"""Monitoring end to end on the session cluster: a real data job and a real 2-worker training
run (Ray Jobs → Ray Train → DeepSpeed ZeRO-3 on gloo), scraped by the cluster's real
Prometheus. The training run hangs once (rank 1 is SIGSTOPped after step 12): rank 0's
watchdog dumps its stacks and fails the attempt, rank 1 is SIGKILLed, Ray Train restarts the
group from the step-10 checkpoint and the run finishes. Then: Prometheus's tokens/s and MFU
agree with the run's own ``metrics.jsonl``, every dashboard panel returns series, the ledger
adds up with the lost steps attributed, and ``crucible report`` draws its charts.

The run is stopped as a user stops one (``crucible jobs stop``) once Prometheus has scraped the
final attempt's rank 0 SCRAPES times: how many steps fit into that depends on the machine, so
the run's length is set by what was observed, not by a step count."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from crucible.cluster.storage import location
from crucible.jobs.spec import parse_spec
from crucible.monitoring import dashboards as dash
from crucible.monitoring.ledger import account

pytestmark = pytest.mark.slow

# Far more steps than it runs (the final attempt runs about 30 here), yet a bound: should the
# test process die before stopping the run, the job still ends within minutes.
MAX_STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, WORKERS = 1000, 64, 8, 64, 2
# Scrapes (5 s apart) of the final attempt's rank 0 before the run is stopped: several rates
# and rule evaluations after the restart.
SCRAPES = 4
HANG_AFTER_STEP = 12  # two steps past the step-10 checkpoint: their time is lost
HANG_TIMEOUT_S = 8.0  # well above a step or a checkpoint (~2 s with Ray Train's report)
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ_LEN


@pytest.fixture(scope="module")
def storage(local_cluster, tmp_path_factory) -> Iterator[Path]:
    """CRUCIBLE_HOME pointing at the session cluster for this module; the storage root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
        yield tmp_path_factory.mktemp("monitored-runs")


def run_job(spec_data: dict[str, Any], during=None) -> tuple[Path, str]:
    """Submit a spec as a Ray job and wait for it, with ``during(run_dir, stop)`` in a thread
    (``stop()`` stops the job as ``crucible jobs stop`` does); return (run dir, job log)."""
    from crucible.jobs.stop import stop_job
    from crucible.jobs.submit import submit_run

    client, job_id, run = submit_run(parse_spec(spec_data))
    run_dir = run.local_path  # these runs' storage is a local path
    t0 = time.monotonic()
    stop = lambda: stop_job(client, job_id)  # noqa: E731
    worker = threading.Thread(target=during, args=(run_dir, stop), daemon=True) if during else None
    if worker:
        worker.start()
    log = "".join(client.follow(job_id))
    if worker:
        worker.join(timeout=120)
    assert str(client.status(job_id)).endswith("SUCCEEDED"), log[-5000:]
    (run_dir.parent / f"{run_dir.name}.log").write_text(f"{time.monotonic() - t0:.1f} s\n{log}")
    return run_dir, log


@pytest.fixture(scope="module")
def data_run(cluster_data_run: dict[str, Any]) -> Path:
    """The session's data job (it exported its metrics through the cluster): text → shards."""
    return Path(cluster_data_run["run"])


def hang_rank1_after(step: int, prometheus_url: str):
    """SIGSTOP rank 1 once ``step`` is logged; SIGKILL it once rank 0's watchdog fired; stop
    the run once Prometheus has scraped the final attempt's rank 0 SCRAPES times."""

    def inject(run_dir: Path, stop) -> None:
        try:
            hang(run_dir)
        finally:  # whatever happened, the run ends (the tests below say what went wrong)
            stop()

    def hang(run_dir: Path) -> None:
        metrics, stacks = run_dir / "metrics.jsonl", run_dir / "workers" / "rank-0.stacks.log"
        deadline = time.monotonic() + 300
        pid = None
        while pid is None and time.monotonic() < deadline:
            if metrics.exists() and f'"step": {step},' in metrics.read_text():
                pid = int((run_dir / "workers" / "rank-1.pid").read_text())
                os.kill(pid, signal.SIGSTOP)
            time.sleep(0.02)
        if pid is None:
            return  # the run never got there
        while time.monotonic() < deadline and not stacks.exists():
            time.sleep(0.2)
        time.sleep(0.5)  # let the dump finish before the peer dies
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        # The final attempt's rank 0 is a series (exporter port) first scraped after the kill.
        from drill import scrape_counts

        while time.monotonic() < deadline:
            got = scrape_counts(prometheus_url, 'crucible_train_step{run="mon-train", rank="0"}')
            final = [n for _, first, n in got if first > killed]
            if final and max(final) >= SCRAPES:
                return
            time.sleep(0.5)

    return inject


@pytest.fixture(scope="module")
def train_run(storage: Path, data_run: Path, local_cluster) -> dict[str, Any]:
    """The monitored training run; returns its run dir, log and wall-clock bounds."""
    t0 = time.time()
    run_dir, log = run_job(
        {
            "kind": "train", "name": "mon-train", "cluster": {"storage": str(storage)},
            "model": {"preset": "tiny"},
            "data": {"shards": str(data_run / "shards")},
            "optim": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH,
                      "warmup_steps": 5, "lr": 1e-3},
            "checkpoint": {"every_steps": 10, "keep_last": 2},
            "train": {"num_workers": WORKERS, "max_steps": MAX_STEPS, "eval_every": 20,
                      "eval_batches": 1, "hang_timeout_s": HANG_TIMEOUT_S,
                      "gpu_hour_budget": 1.0},
        },
        during=hang_rank1_after(HANG_AFTER_STEP, local_cluster.prometheus_url),
    )  # fmt: skip
    last = max(r["step"] for r in records(run_dir) if r["kind"] == "step")
    return {"dir": run_dir, "log": log, "submitted": t0, "done": time.time(), "last": last}


def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def attempts_of(recs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Step records split at each resume record (one list per attempt)."""
    out: list[list[dict[str, Any]]] = [[]]
    for r in recs:
        if r["kind"] == "resume":
            out.append([])
        elif r["kind"] == "step":
            out[-1].append(r)
    return out


def prom(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    r = requests.get(f"{url}/api/v1/query", params=params, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def samples(url: str, expr: str, window: str = "10m") -> list[tuple[float, float]]:
    """Raw scraped samples over the last ``window``, by time; each attempt's exporter is a
    series of its own (another port), and attempts never overlap."""
    got = prom(url, f"{expr}[{window}]")
    assert got, expr
    return sorted((float(t), float(v)) for series in got for t, v in series["values"])


def test_the_hang_is_dumped_and_the_run_resumes(train_run) -> None:
    run_dir, log = train_run["dir"], train_run["log"]
    stacks = (run_dir / "workers" / "rank-0.stacks.log").read_text()
    assert "no step progress for" in stacks and f"(timeout {HANG_TIMEOUT_S:g} s)" in stacks
    assert "train_loop_per_worker" in stacks  # the main thread's frames, where it hung
    recs = records(run_dir)
    (resume,) = [r for r in recs if r["kind"] == "resume"]
    assert resume["step"] == 10, log[-3000:]
    first, last = attempts_of(recs)
    assert [r["step"] for r in first][-1] >= HANG_AFTER_STEP
    assert [r["step"] for r in last] == list(range(11, train_run["last"] + 1))
    assert f"step {train_run['last']}/{MAX_STEPS} " in log and " MFU " in log
    assert "stopped on request" in log


def test_prometheus_tokens_and_mfu_match_the_runs_log(train_run, local_cluster) -> None:
    url, run_dir = local_cluster.prometheus_url, train_run["dir"]
    steps = attempts_of(records(run_dir))[-1]
    sel = '{run="mon-train", rank="0"}'
    tokens = samples(url, f"crucible_train_tokens_total{sel}")
    step_at = dict(samples(url, f"crucible_train_step{sel}"))
    # The final attempt's scrapes: its counter restarted at the step-10 checkpoint.
    final = [(t, v) for t, v in tokens if step_at.get(t, 0) > 10 and t > steps[0]["time"] - 1]
    assert len(final) >= 3, (tokens, step_at)  # several 5 s scrapes of the final attempt
    for t, v in final:
        # The counter is the steps done since the restart (one step ahead if the scrape fell
        # between on_step's counter and gauge updates).
        assert v - (step_at[t] - 10) * TOKENS_PER_STEP in (0, TOKENS_PER_STEP)
    # tokens/s over the scraped span against the log's steps finished in that span. A step
    # whose record lands within milliseconds of a scrape can fall on either side: at most
    # one step's tokens at each end, i.e. 2 × 4096 tokens over a span of ≥ 10 s.
    (ta, va), (tb, vb) = final[0], final[-1]
    logged = sum(r["tokens"] for r in steps if ta < r["time"] <= tb)
    scraped_rate, logged_rate = (vb - va) / (tb - ta), logged / (tb - ta)
    assert abs(scraped_rate - logged_rate) <= 2 * TOKENS_PER_STEP / (tb - ta), (
        scraped_rate,
        logged_rate,
    )
    # MFU: the scraped gauge is the log's figure for the same step, to the last bit (both
    # are one float64 computed once; the exposition format prints it with repr).
    by_step = {r["step"]: r for r in steps}
    mfus = samples(url, f"crucible_train_mfu_ratio{sel}")
    checked = 0
    for t, m in mfus:
        s = step_at.get(t)
        if s in by_step and s - 1 in by_step and t > steps[0]["time"]:
            # (or the previous step's, if the scrape fell inside on_step)
            assert m in (by_step[s]["mfu"], by_step[s - 1]["mfu"]), (s, m, by_step[s]["mfu"])
            checked += 1
    assert checked >= 3
    # ... and the log's MFU is PaLM's: model FLOPs/token × tokens/s ÷ (devices × peak).
    (fpt,) = prom(url, f"crucible_train_model_flops_per_token{sel}", at=final[-1][0])
    (peak,) = prom(url, f"crucible_device_peak_flops{sel}", at=final[-1][0])
    r = steps[-1]
    assert r["mfu"] == pytest.approx(
        float(fpt["value"][1]) * r["tokens_per_s"] / (WORKERS * float(peak["value"][1])),
        rel=1e-9,
    )
    assert 0 < r["mfu"] < 1


def _last_sample_time(url: str, expr: str) -> float:
    return samples(url, expr, window="2h")[-1][0]  # the session's data job may be long done


def test_every_dashboard_panel_returns_series(train_run, data_run, local_cluster) -> None:
    import torch

    url = local_cluster.prometheus_url
    # Evaluate each query at the last scrape of the job it shows (after a job ends its
    # targets go away and instant queries see stale series).
    at = {
        "training": _last_sample_time(url, 'crucible_train_step{run="mon-train"}'),
        "cost": _last_sample_time(url, 'crucible_train_step{run="mon-train"}'),
        "data": _last_sample_time(
            url, 'crucible_data_last_update_timestamp_seconds{run="mon-data"}'
        ),
    }
    runs = {"training": "mon-train", "cost": "mon-train", "data": "mon-data"}
    empty = []
    for name in runs:  # the PPO dashboard is checked by the PPO test
        for panel in dash.DASHBOARDS[name]()["panels"]:
            if panel["title"] in dash.GPU_ONLY and not torch.cuda.is_available():
                continue
            for target in panel["targets"]:
                expr = dash.resolve(target["expr"], runs[name], scrape_interval_s=5, step_s=15)
                if not prom(url, expr, at=at[name]):
                    empty.append((name, panel["title"], expr))
    assert not empty, empty
    # Cost series come from the live ledger: the dead attempt's steps after step 10 are lost.
    phases = {
        s["metric"]["phase"]: float(s["value"][1])
        for s in prom(url, 'crucible_gpu_seconds_total{run="mon-train"}', at=at["cost"])
    }
    assert phases["lost"] > 0 and phases["productive"] > 0 and phases["startup"] > 0
    (restarts,) = prom(url, 'max(crucible_train_restarts_total{run="mon-train"})', at=at["cost"])
    assert float(restarts["value"][1]) == 1


def test_the_ledger_adds_up_with_the_lost_steps_attributed(train_run) -> None:
    run_dir = train_run["dir"]
    led = account(run_dir)
    assert led.attempts == 2 and led.corrupt_lines == 0 and not led.running
    from crucible.monitoring.ledger_format import read_attempts

    assert read_attempts(location(run_dir))[0][-1].status == "stopped"  # its step saved
    # Every device-second between the first attempt's start and the run's end is in exactly
    # one phase (intervals never overlap and gaps are idle or restart time).
    assert led.total_seconds == pytest.approx(led.wall_seconds * WORKERS, rel=1e-6)
    # The ledger's wall time lies within the job's (submit → done) and covers every step.
    steps = [r for a in attempts_of(records(run_dir)) for r in a]
    first_step_start = steps[0]["time"] - steps[0]["step_seconds"]
    assert steps[-1]["time"] - first_step_start < led.wall_seconds
    assert led.wall_seconds < train_run["done"] - train_run["submitted"]
    # Productive: steps 1–10 of the first attempt and the rest of the second; lost: the first
    # attempt's steps after its step-10 checkpoint. Both to the log's own step times.
    first, last = attempts_of(records(run_dir))

    def busy(rs: list[dict[str, Any]]) -> float:
        return sum(r["step_seconds"] - r["data_wait_seconds"] for r in rs) * WORKERS

    lost = [r for r in first if r["step"] > 10]
    assert len(lost) >= HANG_AFTER_STEP - 10
    # (to float64 unix-time resolution: 2.4e-7 s per timestamp, over some tens of steps)
    assert led.seconds["lost"] == pytest.approx(busy(lost), rel=1e-5)
    productive = [r for r in first if r["step"] <= 10] + last
    assert led.seconds["productive"] == pytest.approx(busy(productive), rel=1e-5)
    # The hang (≥ the watchdog timeout, on both devices) is restart time, not productive.
    assert led.seconds["startup"] > HANG_TIMEOUT_S * WORKERS
    assert led.seconds["checkpoint"] > 0 and led.seconds["eval"] > 0
    # The checkpoint's copy of the ledger is the ledger as it stood then (one source).
    from crucible.jobs.train import checkpoint as ckpt

    state = ckpt.read_state(ckpt.step_path(location(run_dir / "checkpoints"), train_run["last"]))
    assert 0 < state["ledger"]["worker_seconds"] < led.total_seconds
    assert state["ledger"]["attempts"] == 2


def test_report_draws_the_run(train_run) -> None:
    run_dir = train_run["dir"]
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "report", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = run_dir / "report"
    for name in ("loss", "throughput", "mfu", "gpu_hours"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| restarts | 1 |" in md and "| lost |" in md and "MFU (recent)" in md
    assert not math.isnan(account(run_dir).goodput)
