"""Grafana dashboards (Training, Data pipeline, Cost, PPO), built here and written as JSON.

``python -m crucible.monitoring.dashboards`` rewrites ``monitoring/dashboards/*.json``; a test
checks the files match this code. Every panel queries ``${datasource}``, a datasource template
variable (any Prometheus of the Grafana it is imported into; ``__inputs`` makes Grafana's
import dialog ask for one), and takes a ``$run`` variable. With the provisioning files in
``monitoring/grafana/provisioning`` the variable starts on the datasource they create
(uid :data:`DATASOURCE_UID`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE_UID = "crucible-prometheus"
DS = {"type": "prometheus", "uid": "${datasource}"}
INPUT = "DS_PROMETHEUS"  # the import dialog's name for the datasource it asks for
OUT_DIR = Path(__file__).parent / "dashboards"
SCHEMA_VERSION = 39
# Panels whose series exist only on NVIDIA GPUs (NVML / torch.cuda); empty on CPU runs.
GPU_ONLY = {"GPU utilisation (NVML)", "GPU power (NVML)", "Device memory (torch.cuda)"}

R = '{run="$run"}'


def resolve(expr: str, run: str, scrape_interval_s: float, step_s: float) -> str:
    """A panel's expression as Grafana sends it to Prometheus for ``run``.

    Args:
        expr: a target's ``expr``, with ``$run`` and ``$__rate_interval``.
        run: the value of the ``$run`` variable.
        scrape_interval_s: the datasource's scrape interval.
        step_s: the query's step (Grafana's ``$__interval``).

    ``$__rate_interval`` is Grafana's: max(4 × scrape interval, step + scrape interval), so a
    rate spans at least four scrapes and never falls between two steps.
    """
    rate = max(4 * scrape_interval_s, step_s + scrape_interval_s)
    return expr.replace("$run", run).replace("$__rate_interval", f"{rate:g}s")


def _target(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series") -> dict:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "format": fmt}


def panel(
    title: str,
    exprs: list[tuple[str, str]],
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    stack: bool = False,
    fmt: str = "time_series",
) -> dict[str, Any]:
    """One panel; ``exprs`` are (PromQL, legend) pairs. Position is set by :func:`dashboard`.

    Args:
        title: panel title.
        exprs: queries with their legends.
        kind: Grafana panel type (timeseries, stat, heatmap, bargauge).
        unit: Grafana unit id (``s``, ``bytes``, ``percentunit``, ``short``...).
        w: width in grid columns (of 24).
        h: height in grid rows.
        description: hover text.
        stack: stack series (timeseries).
        fmt: query format (``heatmap`` for bucket heatmaps).
    """
    refs = "ABCDEFGH"
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "targets": [_target(e, leg, refs[i], fmt) for i, (e, leg) in enumerate(exprs)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries" and stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 40}
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "values": False}}
    return p


def dashboard(uid: str, title: str, panels: list[dict[str, Any]], run_metric: str) -> dict:
    """A dashboard with a ``$run`` variable, panels laid out left to right, top to bottom.

    Args:
        uid: stable dashboard uid.
        title: dashboard title.
        panels: from :func:`panel`.
        run_metric: a metric whose ``run`` label values fill the variable.
    """
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        g = p["gridPos"]
        if x + g["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        g["x"], g["y"] = x, y
        x += g["w"]
        row_h = max(row_h, g["h"])
        p["id"] = i
    return {
        "__inputs": [
            {
                "name": INPUT,
                "label": "Prometheus",
                "description": "Prometheus scraping crucible",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}
        ],
        "uid": uid,
        "title": title,
        "tags": ["crucible"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "timezone": "browser",
        "refresh": "10s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Crucible Prometheus", "value": DATASOURCE_UID},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "run",
                    "label": "Run",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": f"label_values({run_metric}, run)", "refId": "run"},
                    "definition": f"label_values({run_metric}, run)",
                    "refresh": 2,
                    "includeAll": False,
                    "multi": False,
                    "sort": 1,
                },
            ]
        },
        "panels": panels,
    }


def training() -> dict[str, Any]:
    """Throughput, MFU, loss, step-time heatmap, checkpoints, restarts."""
    rate = "[$__rate_interval]"
    return dashboard("crucible-training", "Crucible / Training", [
        panel("Progress", [(f"max(crucible_train_step{R}) / max(crucible_train_target_steps{R})",
                            "steps done")], "stat", "percentunit", w=4, h=5),
        panel("Tokens / s", [(f"run:crucible_train_tokens:rate1m{R}", "tokens/s")],
              "stat", "short", w=4, h=5),
        panel("MFU", [(f"run:crucible_train_mfu:ratio_rate1m{R}", "MFU")], "stat",
              "percentunit", w=4, h=5),
        panel("Restarts", [(f"max(crucible_train_restarts_total{R})", "restarts")], "stat",
              w=4, h=5),
        panel("Last checkpoint (step)", [(f"max(crucible_checkpoint_last_step{R})", "step")],
              "stat", w=4, h=5),
        panel("Since last checkpoint", [(
            f"time() - max(crucible_checkpoint_last_timestamp_seconds{R} > 0)", "age")],
              "stat", "s", w=4, h=5),
        panel("Throughput", [(f"run:crucible_train_tokens:rate1m{R}", "tokens/s"),
                             (f"sum(rate(crucible_train_samples_total{R}{rate}))", "samples/s")]),
        panel("MFU and FLOP/s per device", [
            (f"run:crucible_train_mfu:ratio_rate1m{R}", "MFU (token rate)"),
            (f"max(crucible_train_mfu_ratio{R})", "MFU (last step)")], unit="percentunit",
              description="PaLM MFU: model FLOPs/token × tokens/s ÷ (devices × peak)."),
        panel("Loss", [(f"max(crucible_train_loss{R})", "train"),
                       (f"max(crucible_train_heldout_loss{R})", "held-out")]),
        panel("Step time (heatmap)", [(
            f"sum by (le) (rate(crucible_train_step_seconds_bucket{R}{rate}))", "{{le}}")],
              "heatmap", "s", fmt="heatmap"),
        panel("Step time p50 / p95", [
            (f"histogram_quantile(0.5, sum by (le) (rate(crucible_train_step_seconds_bucket{R}{rate})))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(crucible_train_step_seconds_bucket{R}{rate})))", "p95"),
            (f"sum(rate(crucible_train_data_wait_seconds_total{R}{rate})) / sum(rate(crucible_train_step_seconds_count{R}{rate}))", "data wait / step")], unit="s"),
        panel("Learning rate and grad norm", [(f"max(crucible_train_learning_rate{R})", "lr"),
                                              (f"max(crucible_train_grad_norm{R})", "grad norm")]),
        panel("Checkpoint save time and size", [
            (f"sum(increase(crucible_checkpoint_save_seconds_total{R}[1h]))", "save s / h"),
            (f"sum(increase(crucible_checkpoint_saved_bytes_total{R}[1h])) / 1e9", "GB / h")]),
        panel("Process memory by rank", [(
            'crucible_process_resident_memory_bytes{run="$run", job="train"}', "rank {{rank}}")],
              unit="bytes"),
        panel("GPU utilisation (NVML)", [(f"crucible_gpu_utilization_ratio{R}", "rank {{rank}}")],
              unit="percentunit"),
        panel("GPU power (NVML)", [(f"crucible_gpu_power_watts{R}", "rank {{rank}}")], unit="watt"),
        panel("Device memory (torch.cuda)", [
            (f"crucible_device_memory_allocated_bytes{R}", "allocated rank {{rank}}"),
            (f"crucible_device_memory_peak_bytes{R}", "peak rank {{rank}}")], unit="bytes"),
    ], "crucible_train_step")  # fmt: skip


def data() -> dict[str, Any]:
    """Per-step flow, drop reasons, dedup."""
    rate = "[$__rate_interval]"
    return dashboard("crucible-data", "Crucible / Data pipeline", [
        panel("Documents in / out by step", [
            (f"sum by (stage) (crucible_data_documents_in_total{R})", "{{stage}} in"),
            (f"sum by (stage) (crucible_data_documents_out_total{R})", "{{stage}} out")],
              "bargauge", w=12),
        panel("Kept fraction by step", [(
            f"sum by (stage) (crucible_data_documents_out_total{R}) / "
            f"sum by (stage) (crucible_data_documents_in_total{R})", "{{stage}}")],
              "bargauge", "percentunit", w=12),
        panel("Throughput (documents/s)", [(
            f"sum by (stage) (rate(crucible_data_documents_in_total{R}{rate}))", "{{stage}}")]),
        panel("Throughput (bytes/s)", [(
            f"sum by (stage) (rate(crucible_data_bytes_in_total{R}{rate}))", "{{stage}}")],
              unit="Bps"),
        panel("Drops by rule", [(
            f"sum by (stage, rule) (crucible_data_dropped_documents_total{R})",
            "{{stage}}/{{rule}}")], "bargauge", w=12),
        panel("Near-duplicates", [(f"max(crucible_data_duplicate_clusters{R})", "clusters"),
                                  (f"max(crucible_data_duplicate_documents{R})", "documents")],
              "stat", w=12),
    ], "crucible_data_documents_in_total")  # fmt: skip


# The run's device-seconds and goodput computed from the ledger's own series, as the
# recording rules do: a recording rule only holds a value where one of its evaluations fell
# after a scrape had landed, so a short run (or a slow scrape) can leave it empty while the raw
# series have data.
GPU_SECONDS = (
    f"(sum by (run) (crucible_gpu_seconds_total{R}) "
    f"+ sum by (run) (crucible_gpu_uncommitted_seconds{R}))"
)
GOODPUT = (
    f'sum by (run) (crucible_gpu_seconds_total{{run="$run", phase="productive"}}) / {GPU_SECONDS}'
)


def cost() -> dict[str, Any]:
    """GPU-hours by phase, goodput, budget burn-down."""
    return dashboard("crucible-cost", "Crucible / Cost", [
        panel("GPU-hours", [(f"{GPU_SECONDS} / 3600", "GPU-hours")], "stat",
              w=6, h=5),
        panel("Goodput", [(GOODPUT, "goodput")], "stat",
              "percentunit", w=6, h=5,
              description="Productive device time (steps kept by a committed checkpoint) ÷ all."),
        panel("Budget left (GPU-hours)", [(
            f"(max(crucible_gpu_budget_seconds{R}) - sum({GPU_SECONDS})) / 3600",
            "left")], "stat", w=6, h=5),
        panel("Projected GPU-hours at the end", [(
            f"sum({GPU_SECONDS}) / (max(crucible_train_step{R}) / "
            f"max(crucible_train_target_steps{R})) / 3600", "projected")], "stat", w=6, h=5),
        panel("GPU-hours by phase", [(
            f"sum by (phase) (crucible_gpu_seconds_total{R}) / 3600", "{{phase}}"),
            (f"sum(crucible_gpu_uncommitted_seconds{R}) / 3600", "uncommitted")], stack=True,
              description="Productive, lost, checkpoint, data wait, eval, start-up, idle."),
        panel("Goodput over time", [(GOODPUT, "goodput")],
              unit="percentunit"),
        panel("GPU-hours lost, by cause", [(
            f"sum by (cause) (crucible_gpu_badput_seconds_total{R}) / 3600", "{{cause}}")],
              "bargauge", description="Badput: start-up, restarts, checkpoint save (blocked) and "
              "load, rollback, preemption, data wait, hang, evaluation, idle, lost steps."),
        panel("Budget burn-down (GPU-hours)", [
            (f"max(crucible_gpu_budget_seconds{R}) / 3600", "budget"),
            (f"sum({GPU_SECONDS}) / 3600", "used")]),
        panel("Burn rate (devices busy)", [(
            f"sum(rate(crucible_gpu_seconds_total{R}[$__rate_interval]))", "device-s / s")]),
    ], "crucible_gpu_seconds_total")  # fmt: skip


def ppo() -> dict[str, Any]:
    """PPO steps: the reward model's score, the KL to the reference, clipping, the critic, and
    where each step's time goes. The run's GPU-hours and goodput are on the Cost dashboard."""
    rate = "[$__rate_interval]"

    def phase(name: str) -> str:
        return f'rate(crucible_ppo_phase_seconds_total{{run="$run", phase="{name}"}}{rate})'

    return dashboard("crucible-ppo", "Crucible / PPO", [
        panel("Progress", [(f"max(crucible_ppo_step{R}) / max(crucible_ppo_total_steps{R})",
                            "steps done")], "stat", "percentunit", w=6, h=5),
        panel("Score (last rollout)", [(f"max(crucible_ppo_score_mean{R})", "score")], "stat",
              w=6, h=5),
        panel("KL to the reference", [(f"max(crucible_ppo_kl{R})", "KL")], "stat", w=6, h=5),
        panel("Since last step", [(
            f"time() - max(crucible_ppo_last_step_timestamp_seconds{R})", "age")], "stat", "s",
              w=6, h=5),
        panel("Reward-model score", [(f"max(crucible_ppo_score_mean{R})", "mean score")],
              description="Mean score of each step's rollout answers."),
        panel("KL and its coefficient", [(f"max(crucible_ppo_kl{R})", "KL (nats / answer)"),
                                         (f"max(crucible_ppo_kl_coef{R})", "coefficient")]),
        panel("Policy clip fraction", [(f"max(crucible_ppo_clip_fraction_ratio{R})", "clipped")],
              unit="percentunit", description="Share of policy ratios outside 1 ± clip."),
        panel("Critic value loss", [(f"max(crucible_ppo_value_loss{R})", "value loss")]),
        panel("Time by phase", [(
            f"avg by (phase) (rate(crucible_ppo_phase_seconds_total{R}{rate}))", "{{phase}}")],
              unit="percentunit", stack=True,
              description="Share of a rank's time in generation, scoring and updates."),
        panel("Generation and training tokens / s", [
            (f"sum(rate(crucible_ppo_generated_tokens_total{R}{rate})) / "
             f"avg({phase('generation')})", "generated per s of generation"),
            (f"sum(rate(crucible_ppo_rollout_tokens_total{R}{rate})) / "
             f"avg({phase('training')})", "rollout per s of updates")],
              description="Tokens over all ranks per second spent in the phase."),
        panel("Process memory by rank", [(
            'crucible_process_resident_memory_bytes{run="$run", job="ppo"}', "rank {{rank}}")],
              unit="bytes", w=24),
    ], "crucible_ppo_step")  # fmt: skip


DASHBOARDS = {"training": training, "data": data, "cost": cost, "ppo": ppo}


def write_dashboards(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every dashboard as ``<out_dir>/<name>.json``.

    Args:
        out_dir: destination folder.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_dashboards():
        print(p)
