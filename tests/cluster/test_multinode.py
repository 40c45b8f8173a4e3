"""Multi-node on one machine, sharing nothing but object storage (``bench/drill.py``): a
token-authenticated Ray cluster of a head and nodes joined on their own loopback addresses
(separate ``ray start --block`` processes, 1 CPU and a scratch directory each) and a real S3
server (moto, with IAM auth) as the only storage the jobs share. The data job writes shards to
S3; a 2-worker STRICT_SPREAD train job puts a rank on each node; one node is killed mid-run
and a replacement joins (what an autoscaler would do): Ray Train restarts the worker group
from the S3 checkpoint, and every step the first attempt had logged past that checkpoint is
re-run with a bitwise identical loss (so the state restored from S3 is exact); once
Prometheus has scraped the replacement the drill stops the run, as a user does; the export
reads the run from S3 and gives the same logits in ``transformers``.

Also the placement check the driver makes before asking Ray for workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from crucible.cluster.storage import location
from crucible.errors import CrucibleError
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train.run import check_placement

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import drill

# --- the placement check (fast) -------------------------------------------------------------


def _spec(strategy: str, workers: int = 2, cpus: float = 1) -> TrainRunSpec:
    spec = parse_spec(
        {
            "kind": "train",
            "name": "p",
            "model": {"preset": "tiny"},
            "data": {"shards": "/nonexistent"},
            "train": {
                "num_workers": workers,
                "cpus_per_worker": cpus,
                "max_steps": 1,
                "placement_strategy": strategy,
            },
        }
    )
    assert isinstance(spec, TrainRunSpec)
    return spec


def test_placement_strategy_defaults_to_pack_and_rejects_unknown() -> None:
    assert _spec("PACK").train.placement_strategy == "PACK"
    with pytest.raises(Exception, match="placement_strategy"):
        _spec("ROUND_ROBIN")


@pytest.mark.parametrize(
    ("strategy", "nodes", "workers", "cpus", "error"),
    [
        ("STRICT_SPREAD", [{"CPU": 2}], 2, 1, "one node per worker, but 1 node"),
        ("STRICT_SPREAD", [{"CPU": 1}, {"CPU": 0.5}], 2, 1, "but 1 node"),
        ("STRICT_SPREAD", [{"CPU": 1}, {"CPU": 1}], 2, 1, None),
        ("STRICT_PACK", [{"CPU": 1}, {"CPU": 1}], 2, 1, "the largest node holds 1"),
        ("STRICT_PACK", [{"CPU": 2}, {"CPU": 1}], 2, 1, None),
        # Totals are enough (4 CPUs) but no single node holds a 3-CPU worker.
        ("PACK", [{"CPU": 2}, {"CPU": 2}], 1, 3, "the nodes hold 0 in all"),
        ("SPREAD", [{"CPU": 3}, {"CPU": 1}], 2, 2, "the nodes hold 1 in all"),
        ("PACK", [{"CPU": 1}, {"CPU": 1}], 2, 1, None),
    ],
)
def test_placement_the_nodes_can_never_hold_is_refused(
    strategy: str, nodes: list[dict[str, float]], workers: int, cpus: float, error: str | None
) -> None:
    spec = _spec(strategy, workers, cpus)
    if error is None:
        check_placement(spec, nodes, use_gpu=False)
        return
    with pytest.raises(CrucibleError, match=error) as e:
        check_placement(spec, nodes, use_gpu=False)
    assert f"train.placement_strategy {strategy}" in str(e.value) and "\n" not in str(e.value)


def test_gpu_workers_need_a_gpu_on_each_spread_node() -> None:
    spec = _spec("STRICT_SPREAD")
    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 8}]
    with pytest.raises(CrucibleError, match="1 CPU, 1 GPU needs one node per worker"):
        check_placement(spec, nodes, use_gpu=True)
    check_placement(spec, nodes, use_gpu=False)


# --- the drill: the user path on object storage only ------------------------------------


@pytest.mark.slow
def test_multinode_drill_on_object_storage_resumes_bitwise(s3, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from crucible.jobs.train.export import load_model

    with drill.multinode(s3, {"b": "127.0.0.2"}) as cluster:
        ids_before = cluster.alive()
        got = drill.run_drill(cluster, s3, tmp_path, reference=False)
        watched = what_prometheus_saw(cluster.state.prometheus_url, got)
    print("\n" + "\n".join(f"{k:<52} {v:6.1f} s" for k, v in got.phases.items()))

    # The nodes were distinct hosts to Ray: a head and a node on 127.0.0.2, then 127.0.0.3.
    assert {n: ip for n, (_, ip) in ids_before.items() if n != "head"} == {"b": "127.0.0.2"}
    assert ids_before["head"][1] == drill.HEAD_IP
    assert set(got.nodes_after) == {"head", "c"} and got.nodes_after["c"][1] == "127.0.0.3"
    assert got.nodes_after["head"][0] == ids_before["head"][0]
    # STRICT_SPREAD: one rank on each 1-CPU node, before and after the loss of node b.
    assert set(got.placements["before"].values()) == {"head", "b"}, got.placements
    assert set(got.placements["after"].values()) == {"head", "c"}, got.placements

    # Everything went to the bucket; the data job's shards are what the runs read.
    assert got.data_run == "s3://drill/runs/data" and got.run == "s3://drill/runs/node-loss"
    spec = (location(got.run) / "spec.resolved.yaml").read_text()
    assert "shards: s3://drill/runs/data/shards" in spec
    assert "aws_secret" not in json.dumps(got.logs).lower()
    assert s3.rw[1] not in json.dumps(got.logs)  # the secret never reaches a job log

    resumes = drill.records(got.run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == got.kill_after, got.logs["run"][-3000:]
    assert resumes[0]["world_size"] == 2 and resumes[0]["from"].startswith("s3://")
    first, resumed = drill.losses_by_attempt(got.run)
    assert sorted(resumed) == list(range(got.kill_after + 1, got.last_step + 1))
    # the drill stopped the run once it had seen node c scraped: the step it stopped at saved
    assert f"stopped at step {got.last_step} (saved)" in got.logs["stop"], got.logs["stop"]
    assert (
        location(got.run) / "checkpoints" / "latest"
    ).read_text().strip() == f"step-{got.last_step}"
    assert set(range(1, got.kill_after + 2)) <= set(first)  # the kill came after a step past it
    redone = sorted(set(first) & set(resumed))
    assert redone and redone[0] == got.kill_after + 1
    assert {s: first[s] for s in redone} == {s: resumed[s] for s in redone}  # bitwise

    # Prometheus, finding targets only through the registry's HTTP SD, scraped ranks on every
    # node the run used, saw the restart and the lost device time; every dashboard panel
    # (GPU-only ones aside) has data for the runs.
    assert watched["instances"] == {drill.HEAD_IP, "127.0.0.2", "127.0.0.3"}, watched
    assert watched["restarts"] >= 1 and watched["lost_seconds"] > 0, watched
    assert watched["empty_panels"] == [], watched["empty_panels"]

    # The export read the run from S3; transformers gives crucible's logits.
    model = load_model(got.run)
    hf = AutoModelForCausalLM.from_pretrained(got.export_dir).eval()
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)[0]).abs().max().item()
    assert diff <= 1e-4, diff


def what_prometheus_saw(url: str, got: drill.Drill) -> dict:
    """From the cluster's Prometheus, over the drill's time span: which hosts served rank
    metrics of the node-loss run, its restarts and lost device-seconds, and the dashboard
    panels without data. Waits (bounded) for the last scrapes of the final attempt."""
    import time

    from crucible.monitoring import dashboards as dash

    runs = {"training": "node-loss", "cost": "node-loss", "data": "data"}
    panels = [
        (name, p["title"], t["expr"])
        for name in runs  # the PPO dashboard is checked by the PPO test
        for p in dash.DASHBOARDS[name]()["panels"]
        if p["title"] not in dash.GPU_ONLY
        for t in p["targets"]
    ]

    def look() -> dict:
        end = time.time()
        rng = lambda e: drill.prometheus_range(url, e, got.started, end)  # noqa: E731
        # every rank's raw samples: a rank killed soon after its first scrape has samples
        # between two of the range query's evaluation points only
        span = f"{int(end - got.started) + 1}s"
        loss = drill.prometheus_query(
            url,
            f'count_over_time(crucible_train_step_seconds_count{{run="node-loss"}}[{span}])',
            end,
        )
        restarts = rng('max(crucible_train_restarts_total{run="node-loss"})')
        lost = rng('max(crucible_gpu_seconds_total{run="node-loss", phase="lost"})')
        empty = [
            (n, title)
            for n, title, e in panels
            if not rng(dash.resolve(e, runs[n], scrape_interval_s=5, step_s=drill.RANGE_STEP_S))
        ]
        return {
            "instances": {s["metric"]["instance"].rsplit(":", 1)[0] for s in loss},
            "restarts": max((float(v) for s in restarts for _, v in s["values"]), default=0),
            "lost_seconds": max((float(v) for s in lost for _, v in s["values"]), default=0),
            "empty_panels": sorted(set(empty)),
        }

    deadline = time.monotonic() + 60
    seen = look()
    while time.monotonic() < deadline and (seen["empty_panels"] or seen["lost_seconds"] <= 0):
        time.sleep(2)
        seen = look()
    return seen
