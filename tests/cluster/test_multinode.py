"""Multi-node on one machine: a token-authenticated Ray cluster of a head and joined nodes
(separate ``ray start --block`` processes with their own temp dirs, 1 CPU each), a 2-worker
STRICT_SPREAD train job whose ranks land on different nodes, one node killed mid-run and a
replacement joined (what an autoscaler would do): Ray Train restarts the worker group from
the last checkpoint and the run ends bitwise identical to an uninterrupted one.

Also the placement check the driver makes before asking Ray for workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import torch

from crucible.cluster import local
from crucible.errors import CrucibleError
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.run import check_placement

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_ports, short_tmpdir

RAY_ENV = {
    # A dead node is declared dead after ~3 missed 0.5 s health checks instead of Ray's
    # default 5 × 3 s, so the restart does not wait on detection (read by the head's GCS).
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # On SIGTERM a node first drains for up to 30 s (for Serve on Kubernetes); after a Ray
    # Train job it never becomes idle, so the head would wait all 30 s at teardown.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
MAX_STEPS, EVERY, KILL_AFTER = 12, 4, 8


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


# --- the cluster ----------------------------------------------------------------------------


def join_node(state: local.ClusterState, name: str, temp_dir: Path) -> subprocess.Popen[bytes]:
    """Start a 1-CPU node that joins the head, as its own ``ray start --block`` process group,
    authenticated with the head's token file; it carries a resource named after it."""
    gcs = f"{local.HOST}:{state.ports.gcs}"  # the head's GCS listens on loopback too
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(state.token_path),
        RAY_USAGE_STATS_ENABLED="0",
        CRUCIBLE_CLUSTER_STATE=state.state_dir,
    )
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--block",
        "--address", gcs,
        "--node-ip-address", local.HOST,
        "--num-cpus", "1",
        "--resources", json.dumps({f"node_{name}": 1}),
        "--temp-dir", str(temp_dir),
        "--dashboard-agent-listen-port", str(local.free_port()),
        "--metrics-export-port", str(local.free_port()),
        "--object-store-memory", str(200 * 2**20),
        "--disable-usage-stats",
        "--log-style", "record",
    ]  # fmt: skip
    with open(temp_dir.with_suffix(".log"), "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip


def kill_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a joined node: its ``ray start`` process group and every process under it."""
    if proc.returncode is not None:
        return  # already stopped and reaped: its pid (and group id) may belong to others now
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    # Not reaped yet, so the group id is still ours; its own session made pgid == pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(timeout=10)
    psutil.wait_procs(family, timeout=10)


def alive_nodes(state: local.ClusterState) -> dict[str, str]:
    """``{node name: node id}`` of the alive nodes ('head' or the name ``join_node`` gave)."""
    r = requests.get(
        f"{state.dashboard_url}/api/v0/nodes?detail=1",
        headers=local.auth_headers(state.token_path),
        timeout=10,
    )
    r.raise_for_status()
    out = {}
    for n in r.json()["data"]["result"]["result"]:
        if n["state"] == "ALIVE":
            names = [k[5:] for k in n.get("resources_total", {}) if k.startswith("node_")]
            out["head" if n["is_head_node"] else (names or ["?"])[0]] = n["node_id"]
    return out


def wait_nodes(state: local.ClusterState, names: set[str], timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException, KeyError, ValueError):
            nodes = alive_nodes(state)
            if set(nodes) == names:
                return nodes
        if time.monotonic() > deadline:
            raise AssertionError(f"alive nodes never became {sorted(names)}")
        time.sleep(0.5)


def node_of(pid: int, roots: dict[str, int]) -> str | None:
    """Which node a process runs on: the node whose ``ray start`` process is its ancestor
    (a worker is a child of its node's raylet, itself a child of ``ray start``)."""
    try:
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.NoSuchProcess:
        return None
    found = [name for name, root in roots.items() if root in ancestors]
    return found[0] if len(found) == 1 else None


def wait_for(check: Callable[[], Any], what: str, done: threading.Event, timeout: float = 240):
    """Poll ``check`` until it returns something truthy; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: {'the job ended first' if done.is_set() else 'timed out'}")


def placement(
    run_dir: Path, roots: dict[str, int], done: threading.Event, old: dict[int, int] | None = None
) -> tuple[dict[int, int], dict[int, str]]:
    """Wait for both ranks' live pids (other than ``old``) and their nodes; return
    ``({rank: pid}, {rank: node})``."""

    def check() -> tuple[dict[int, int], dict[int, str]] | None:
        pids, where = {}, {}
        for rank in (0, 1):
            with contextlib.suppress(OSError, ValueError):
                pids[rank] = int((run_dir / "workers" / f"rank-{rank}.pid").read_text())
            if rank in pids and (old is None or pids[rank] != old[rank]):
                node = node_of(pids[rank], roots)
                if node is not None:
                    where[rank] = node
        return (pids, where) if len(where) == 2 else None

    return wait_for(check, f"both workers of {run_dir.name} on known nodes", done)


# --- the run --------------------------------------------------------------------------------


def spread_spec(name: str, storage: Path, shards: Path) -> TrainRunSpec:
    spec = parse_spec(
        {
            "kind": "train",
            "name": name,
            "cluster": {"storage": str(storage)},
            "model": {"preset": "tiny"},
            "data": {"shards": str(shards)},
            "optim": {"global_batch_size": 16, "micro_batch_size": 4, "warmup_steps": 4},
            "checkpoint": {"every_steps": EVERY, "keep_last": 2},
            "train": {
                "num_workers": 2,
                "max_steps": MAX_STEPS,
                "placement_strategy": "STRICT_SPREAD",
                "max_failures": 2,
            },
        }
    )
    assert isinstance(spec, TrainRunSpec)
    return spec


def train(spec: TrainRunSpec, during: Callable[[Path, threading.Event], None]) -> tuple[Path, str]:
    """Submit ``spec`` as a Ray job, with ``during(run_dir, job_ended)`` in a thread; wait for
    both; return (run dir, job log)."""
    from crucible.jobs.submit import submit_run

    client, job_id, run_dir = submit_run(spec)
    ended = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            during(run_dir, ended)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        log = "".join(client.follow(job_id))
    finally:
        ended.set()
        watcher.join(timeout=60)
    assert str(client.status(job_id)).endswith("SUCCEEDED"), log[-5000:]
    if errors:
        raise errors[0]
    assert not watcher.is_alive()
    return run_dir, log


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss of each step; after a resume the re-run steps' later records win."""
    return {r["step"]: r["loss"] for r in records(run_dir, "step")}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The local cluster's head (1 CPU) plus node 'b'; joined nodes are stopped at the end."""
    home = short_tmpdir("crmn")
    monkeypatch.setenv("CRUCIBLE_HOME", str(home))
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    state = None
    try:
        state, started = local.up(home / "cluster", free_ports(), num_cpus=1)
        assert started
        ray_pid = next(p.pid for p in state.procs if p.name == "ray")

        def join(name: str) -> subprocess.Popen[bytes]:
            nodes[name] = join_node(state, name, home / name)
            return nodes[name]

        join("b")
        ids = wait_nodes(state, {"head", "b"})
        roots = {"head": ray_pid, "b": nodes["b"].pid}
        yield {"state": state, "join": join, "nodes": nodes, "ids": ids, "roots": roots}
    finally:
        for proc in nodes.values():
            kill_node(proc)
        if state is not None:
            local.down(Path(state.state_dir))
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_node_loss_resumes_bitwise_on_a_replacement_node(cluster, train_shards, tmp_path) -> None:
    state, roots = cluster["state"], cluster["roots"]
    seen: dict[str, Any] = {}

    def watch_reference(run_dir: Path, done: threading.Event) -> None:
        seen["ref"] = placement(run_dir, roots, done)[1]

    ref_dir, _ = train(spread_spec("ref", tmp_path, train_shards), watch_reference)
    # STRICT_SPREAD: one rank on each 1-CPU node.
    assert set(seen["ref"].values()) == {"head", "b"}, seen["ref"]

    def lose_node_b(run_dir: Path, done: threading.Event) -> None:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(
            lambda: latest.exists() and latest.read_text().strip() == f"step-{KILL_AFTER}",
            f"checkpoint step-{KILL_AFTER} committed",
            done,
        )
        pids, seen["before"] = placement(run_dir, roots, done)
        kill_node(cluster["nodes"]["b"])
        seen["killed_at"] = time.monotonic()
        # What an autoscaler would do: a new node joins; Ray Train places 2 workers again.
        roots["c"] = cluster["join"]("c").pid
        seen["after"] = placement(run_dir, roots, done, old=pids)[1]
        seen["replaced_s"] = time.monotonic() - seen["killed_at"]
        seen["ids"] = alive_nodes(state)

    t0 = time.monotonic()
    run_dir, log = train(spread_spec("node-loss", tmp_path, train_shards), lose_node_b)
    (tmp_path / "node-loss.log").write_text(log)
    print(
        f"\nnode ids {cluster['ids']} then {seen['ids']}\nranks before {seen['before']}, "
        f"after {seen['after']} ({seen['replaced_s']:.1f} s after the kill)\nnode-loss run "
        f"{time.monotonic() - t0:.0f} s; {records(run_dir, 'resume')}\njob log: "
        f"{tmp_path / 'node-loss.log'}"
    )
    assert set(seen["before"].values()) == {"head", "b"}, seen["before"]
    assert set(seen["after"].values()) == {"head", "c"}, seen["after"]
    assert set(seen["ids"]) == {"head", "c"}  # node b is dead, c replaced it
    assert seen["ids"]["head"] == cluster["ids"]["head"]

    resumes = records(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == KILL_AFTER, log[-3000:]
    assert resumes[0]["world_size"] == 2
    assert step_losses(run_dir) == step_losses(ref_dir)  # every step, bitwise
    assert sorted(step_losses(run_dir)) == list(range(1, MAX_STEPS + 1))
    ours, _ = _consolidate(run_dir)
    theirs, _ = _consolidate(ref_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _consolidate(run_dir: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from crucible.jobs.train.export import consolidate

    return consolidate(ckpt.step_path(run_dir / "checkpoints", MAX_STEPS))
