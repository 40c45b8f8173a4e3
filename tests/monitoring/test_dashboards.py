"""Dashboards: valid Grafana dashboard JSON, in sync with the builder, and every panel's
query returns series from a real Prometheus scraping real exporters."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from crucible.cluster.local import ClusterState
from crucible.monitoring import dashboards as dash
from crucible.monitoring.exporter import start_exporter, stop_exporter
from crucible.monitoring.ledger import LedgerCollector, LedgerWriter
from crucible.monitoring.metrics import DataMetrics, TrainMetrics
from crucible.monitoring.ppo_metrics import PPOMetrics
from crucible.monitoring.prometheus import query

PROVISIONING = Path(dash.__file__).parent / "grafana" / "provisioning"


def all_panels() -> Iterator[tuple[str, dict]]:
    for name, build in dash.DASHBOARDS.items():
        for p in build()["panels"]:
            yield name, p


def test_files_match_the_builder() -> None:
    for name, build in dash.DASHBOARDS.items():
        on_disk = json.loads((dash.OUT_DIR / f"{name}.json").read_text())
        assert on_disk == build(), f"run python -m crucible.monitoring.dashboards ({name})"


@pytest.mark.parametrize("name", list(dash.DASHBOARDS))
def test_dashboard_model(name: str) -> None:
    d = json.loads((dash.OUT_DIR / f"{name}.json").read_text())
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and len(d["uid"]) <= 40 and d["title"]
    # Imports into any Grafana: the datasource is a variable the import dialog asks for.
    ds_var, run_var = d["templating"]["list"]
    assert ds_var["name"] == "datasource" and ds_var["type"] == "datasource"
    assert ds_var["query"] == "prometheus" and ds_var["current"]["value"] == dash.DATASOURCE_UID
    assert run_var["name"] == "run" and run_var["datasource"]["uid"] == "${datasource}"
    (inp,) = d["__inputs"]
    assert inp["type"] == "datasource" and inp["pluginId"] == "prometheus"
    assert dash.DATASOURCE_UID not in json.dumps(d["panels"])  # no fixed uid in any query
    ids, cells = set(), set()
    for p in d["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        assert p["type"] in {"timeseries", "stat", "heatmap", "bargauge"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells
                cells.add((x, y))
        assert p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["expr"] and t["datasource"]["uid"] == "${datasource}"


def test_provisioning_creates_the_variables_default_datasource() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "crucible.yml").read_text())
    assert ds["datasources"][0]["uid"] == dash.DATASOURCE_UID
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "crucible.yml").read_text())
    assert prov["providers"][0]["type"] == "file"


STEP_TOKENS, STEP_S, DEVICES, PEAK, FLOPS_PER_TOKEN = 8192, 0.2, 2, 1e12, 1e6
# a PPO step's record as PPOWorker.ppo_step gives it (times as fed, not measured)
PPO_RECORD = {"generation_seconds": 0.1, "score_seconds": 0.02, "train_seconds": 0.08,
              "score_mean": 0.5, "kl": 0.3, "kl_coef": 0.2, "clip_frac": 0.1,
              "value_loss": 0.7, "generated_tokens": 600, "rollout_tokens": 2000}  # fmt: skip


def feed(
    stop: threading.Event,
    run_dir: Path,
    ranks: list[TrainMetrics],
    data: DataMetrics,
    ppo: list[PPOMetrics],
) -> None:
    """Drive the metrics like a training run, a data run and a PPO run would, in real time."""
    ledger = LedgerWriter(run_dir, DEVICES, start_time=time.time() - 5)
    ledger.startup_done()
    step, docs = 0, 0
    while not stop.is_set():
        t0 = time.time()
        step += 1
        loss = 2.0 + 8.0 * math.exp(-step / 30)
        for m in ranks:
            m.on_step(step, loss, 3e-4, 0.8, STEP_TOKENS, 16, STEP_S, data_wait_seconds=0.01)
        if step % 20 == 0:
            for m in ranks:
                m.on_eval(loss + 0.1)
        stop.wait(STEP_S)
        ledger.step(step, t0, time.time(), 0.01)
        if step % 10 == 0:
            t1 = time.time()
            ranks[0].on_checkpoint(step, 0.05, 10_000_000)
            ledger.checkpoint(step, t1, time.time() + 0.05)
        docs += 100
        data.update({
            "read": {"docs_in": docs, "docs_out": docs, "bytes_in": 3000 * docs,
                     "bytes_out": 3000 * docs},
            "quality": {"docs_in": docs, "docs_out": docs * 7 // 10, "bytes_in": 3000 * docs,
                        "bytes_out": 2000 * docs,
                        "dropped": {"too_short": docs // 5, "symbol_ratio": docs // 10}},
        })  # fmt: skip
        data.on_dedup(docs // 20, {"2": docs // 50, "3": docs // 100})
        for m in ppo:
            m.on_step(step, PPO_RECORD)
    ledger.close()


@pytest.fixture
def live_run(prometheus: ClusterState, tmp_path: Path) -> Iterator[float]:
    """Real exporters fed in real time; yields when feeding started."""
    ranks = [TrainMetrics(FLOPS_PER_TOKEN, FLOPS_PER_TOKEN * 4 / 3, DEVICES, PEAK, rank=r,
                          total_steps=1000, gpu_budget_seconds=3600.0)
             for r in range(DEVICES)]  # fmt: skip
    ranks[0].registry.register(LedgerCollector(tmp_path))
    ranks[0].on_restart(1)
    for r, m in enumerate(ranks):  # rank 1 is the straggler the last check reported
        m.on_straggler_check(0.2 if r == 1 else 0.1, 1.9 if r == 1 else 1.0, r == 1)
    data = DataMetrics()
    exporters = [("itest", "train", r, m.registry) for r, m in enumerate(ranks)]
    exporters.append(("itest-data", "data", 0, data.registry))
    ppo = [PPOMetrics(rank=r, total_steps=1000) for r in range(DEVICES)]
    exporters += [("itest-ppo", "ppo", r, m.registry) for r, m in enumerate(ppo)]
    ports = []
    for run, job, rank, reg in exporters:  # announced as the cluster's registry would be
        ports.append(start_exporter(run, job, rank, reg, host="127.0.0.1", announce=False))
        assert ports[-1] is not None
        labels = {"run": run, "job": job, "rank": str(rank)}
        prometheus.registry.register(f"127.0.0.1:{ports[-1]}", labels)
    stop = threading.Event()
    t = threading.Thread(target=feed, args=(stop, tmp_path, ranks, data, ppo), daemon=True)
    t.start()
    try:
        yield time.monotonic()
    finally:
        stop.set()
        t.join()
        for p in ports:
            prometheus.registry.deregister(f"127.0.0.1:{p}")
            stop_exporter(p)  # type: ignore[arg-type]


def test_resolve_substitutes_as_grafana_does() -> None:
    expr = 'rate(crucible_train_tokens_total{run="$run"}[$__rate_interval])'
    # four scrapes at a short step; step + scrape at a long one
    assert dash.resolve(expr, "r1", 5, 5) == 'rate(crucible_train_tokens_total{run="r1"}[20s])'
    assert dash.resolve(expr, "r1", 15, 60) == 'rate(crucible_train_tokens_total{run="r1"}[75s])'
    assert dash.resolve(expr, "r1", 0.5, 1) == 'rate(crucible_train_tokens_total{run="r1"}[2s])'


def resolve(expr: str, run: str) -> str:
    """At this Prometheus' 1 s scrape, for an instant query a dashboard refreshes at 15 s."""
    return dash.resolve(expr, run, scrape_interval_s=1, step_s=15)


@pytest.mark.slow  # a live run scraped over a full rate window
def test_every_panel_query_returns_series(prometheus: ClusterState, live_run: float) -> None:
    import torch

    url = prometheus.prometheus_url
    runs = {"training": "itest", "cost": "itest", "data": "itest-data", "ppo": "itest-ppo"}
    pending = {(name, p["title"], t["expr"]) for name, p in all_panels()
               if torch.cuda.is_available() or p["title"] not in dash.GPU_ONLY
               for t in p["targets"]}  # fmt: skip
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        time.sleep(1)
        pending = {(n, title, e) for n, title, e in pending if not query(url, resolve(e, runs[n]))}
    assert not pending, f"panels without data: {sorted(pending)}"

    # Series carry the discovery labels, and the rates agree with what the run fed in.
    time.sleep(max(0.0, live_run + 14 - time.monotonic()))  # a full 10 s rate window
    # (The 1m recording rules see under a minute of data here, so their absolute values are
    # checked by promtool's unit tests; their ratio holds at any window.)
    (tok,) = query(url, 'sum(rate(crucible_train_tokens_total{run="itest"}[10s]))') or [None]
    fed = STEP_TOKENS / STEP_S
    # Steps take a little over STEP_S (more on a loaded machine), never less.
    assert 0.3 * fed < float(tok["value"][1]) < 1.1 * fed
    (tok1m,) = query(url, 'run:crucible_train_tokens:rate1m{run="itest"}') or [None]
    (mfu,) = query(url, 'run:crucible_train_mfu:ratio_rate1m{run="itest"}') or [None]
    assert float(mfu["value"][1]) == pytest.approx(
        float(tok1m["value"][1]) * FLOPS_PER_TOKEN / (DEVICES * PEAK), rel=0.05
    )
    (last,) = query(url, 'crucible_train_mfu_ratio{run="itest"}') or [None]
    assert float(last["value"][1]) == pytest.approx(fed * FLOPS_PER_TOKEN / DEVICES / PEAK)
    up = query(url, 'up{job="train", run="itest"}') or []
    assert sorted(s["metric"]["rank"] for s in up) == ["0", "1"]
    (steps,) = query(url, 'crucible_train_tokens_total{run="itest", rank="0"}') or [None]
    assert float(steps["value"][1]) % STEP_TOKENS == 0
    # PPO: tokens per second of generation and of updates are the records' ratios; every
    # rank spends its time in the phases as fed.
    ppo = {p["title"]: [t["expr"] for t in p["targets"]] for p in dash.ppo()["panels"]}
    speed = ppo["Generation and training tokens / s"][0]
    (gen,) = query(url, resolve(speed, "itest-ppo")) or [None]
    fed_gen = PPO_RECORD["generated_tokens"] / PPO_RECORD["generation_seconds"]
    assert float(gen["value"][1]) == pytest.approx(fed_gen, rel=0.2)
    share = query(url, resolve(ppo["Time by phase"][0], "itest-ppo"))
    by_phase = {s["metric"]["phase"]: float(s["value"][1]) for s in share or []}
    assert by_phase["generation"] == pytest.approx(by_phase["training"] * 1.25, rel=0.05)


@pytest.mark.slow  # a live run scraped
def test_monitor_names_the_straggler_prometheus_knows(
    prometheus: ClusterState, live_run: float, tmp_path: Path
) -> None:
    from crucible.jobs.cli.monitor import render
    from crucible.monitoring.status import run_status

    run_dir = tmp_path / "itest"
    run_dir.mkdir()
    deadline = time.monotonic() + 60
    st = run_status(run_dir, prometheus.prometheus_url)
    while not st.stragglers and time.monotonic() < deadline:  # until the first scrape
        time.sleep(1)
        st = run_status(run_dir, prometheus.prometheus_url)
    assert st.stragglers == [(1, 1.9)]
    console = Console(width=120, record=True)
    console.print(render(st))
    assert "rank 1 (1.90x the others' busy time)" in console.export_text()


def test_cost_panels_read_the_ledger_series_not_recording_rules() -> None:
    """A recording rule holds a value only where one of its evaluations came after a scrape
    had landed: a short attempt (or a slow scrape of the ledger on object storage) can leave
    it empty while the raw series have data. Found by the multi-node drill, whose Cost
    panels were all empty in one run of four."""
    exprs = [t["expr"] for p in dash.cost()["panels"] for t in p["targets"]]
    assert exprs and not [e for e in exprs if "run:crucible_" in e]
