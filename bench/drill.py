"""The multi-node drill: a user's path on a cluster whose nodes share nothing but object
storage, on one machine.

A real S3-compatible server (moto in server mode, in its own process, with IAM auth) is the
only storage the jobs share. The cluster is crucible's local head (1 CPU, token auth) plus
nodes joined with ``ray start`` on their own loopback addresses (127.0.0.2, 127.0.0.3, ...),
each with its own node-local scratch directory, so nothing can pass between nodes through a
shared disk. The drill: raw text uploaded to the bucket → the data job (Ray Data tasks on
every node) → shards on S3 → a 2-rank train job with one rank on each node (STRICT_SPREAD),
checkpoints on S3 → node b SIGKILLed after a checkpoint is committed, a node c joins (what an
autoscaler would do) → Ray Train restarts the group, which resumes from the S3 checkpoint →
``crucible export`` reads the run from S3.

Used by ``tests/cluster/test_multinode.py`` (which asserts on what it returns) and, as a
benchmark, by ``bench/bench_drill.py`` (which reports each phase's wall time).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from crucible.cluster import local
from crucible.cluster.storage import Location, location, read_jsonl
from crucible.monitoring.prometheus import rule_files

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
HEAD_IP = "127.0.0.4"
# Short runs still get several scrapes per attempt (clusters default to 5 s).
SCRAPE_INTERVAL_S = 2.0
# Requests moto serves before it enforces IAM auth: the setup of the two identities.
_UNAUTHENTICATED_SETUP_CALLS = 6


# --- the object store -----------------------------------------------------------------------


@dataclass
class S3Server:
    """A moto S3 server in its own process on 127.0.0.1, with IAM auth: ``rw`` and ``ro``
    are (access key, secret) of a read-write and a read-only identity."""

    endpoint: str
    rw: tuple[str, str]
    ro: tuple[str, str]

    @property
    def env(self) -> dict[str, str]:
        """The AWS SDKs' standard variables for the read-write identity at this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.rw[0],
            "AWS_SECRET_ACCESS_KEY": self.rw[1],
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-role probing here
        }

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if needed); return ``s3://name``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=self.rw[0], secret_key=self.rw[1], region="us-east-1",
            endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
            allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir(name)
        return f"s3://{name}"


@contextlib.contextmanager
def s3_server(log: Path | None = None) -> Iterator[S3Server]:
    """Start a moto server on a free port of 127.0.0.1 with two IAM identities; stop it after.

    Args:
        log: where the server's own output goes (default: nowhere).
    """
    import boto3

    port = local.free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED_SETUP_CALLS)}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_port(port, proc)
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        keys = {}
        for user, actions in (("rw", ["s3:*"]), ("ro", ["s3:Get*", "s3:List*", "s3:Head*"])):
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
        yield S3Server(endpoint, keys["rw"], keys["ro"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log:
            out.close()  # type: ignore[union-attr]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The local head plus nodes joined on their own loopback addresses (see the module doc)."""

    home: Path
    state: local.ClusterState
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    roots: dict[str, int] = field(default_factory=dict)  # node name -> its `ray start` pid
    ips: dict[str, str] = field(default_factory=dict)

    def join(self, name: str, ip: str) -> None:
        """Start a 1-CPU node ``name`` on address ``ip`` that joins the head with its token; it
        carries a resource named after it and its own scratch directory."""
        temp = self.home / name
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.env)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.state.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            CRUCIBLE_CLUSTER_STATE=self.state.state_dir,
            CRUCIBLE_SCRATCH=str(self.home / f"scratch-{name}"),
        )
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--block",
            "--address", f"{self.state.node_ip}:{self.state.ports.gcs}",
            "--node-ip-address", ip,
            "--num-cpus", "1",
            "--resources", json.dumps({f"node_{name}": 1}),
            "--temp-dir", str(temp),
            "--dashboard-agent-listen-port", str(local.free_port()),
            "--metrics-export-port", str(local.free_port()),
            "--object-store-memory", str(200 * 2**20),
            "--disable-usage-stats",
            "--log-style", "record",
        ]  # fmt: skip
        with open(temp.with_suffix(".log"), "ab") as log:
            self.nodes[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )  # fmt: skip
        self.roots[name] = self.nodes[name].pid
        self.ips[name] = ip

    def kill(self, name: str) -> None:
        """SIGKILL joined node ``name``: its ``ray start`` process group and every process
        under it."""
        proc = self.nodes[name]
        if proc.returncode is not None:
            return  # already stopped and reaped: its pid (and group id) may be reused
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):  # its own session: pgid == pid
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(timeout=10)
        psutil.wait_procs(family, timeout=10)

    def alive(self) -> dict[str, tuple[str, str]]:
        """``{node name: (node id, address)}`` of the alive nodes ('head' or a joined name)."""
        r = requests.get(
            f"{self.state.dashboard_url}/api/v0/nodes?detail=1",
            headers=local.auth_headers(self.state.token_path),
            timeout=10,
        )
        r.raise_for_status()
        out = {}
        for n in r.json()["data"]["result"]["result"]:
            if n["state"] == "ALIVE":
                names = [k[5:] for k in n.get("resources_total", {}) if k.startswith("node_")]
                name = "head" if n["is_head_node"] else (names or ["?"])[0]
                out[name] = (n["node_id"], n["node_ip"])
        return out

    def wait_nodes(self, names: set[str], timeout: float = 120) -> dict[str, tuple[str, str]]:
        """Wait until exactly ``names`` are alive; return them."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(requests.RequestException, KeyError, ValueError):
                nodes = self.alive()
                if set(nodes) == names:
                    return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"alive nodes never became {sorted(names)}")
            time.sleep(0.5)

    def node_of(self, pid: int) -> str | None:
        """Which node a process runs on: the node whose root process is its ancestor."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            return None
        found = [name for name, root in self.roots.items() if root in ancestors]
        return found[0] if len(found) == 1 else None

    def stop(self) -> None:
        """Kill the joined nodes and stop the head."""
        for name in list(self.nodes):
            self.kill(name)
        local.down(Path(self.state.state_dir))


@contextlib.contextmanager
def multinode(server: S3Server, nodes: dict[str, str]) -> Iterator[Cluster]:
    """A head (1 CPU) plus joined ``{name: address}`` nodes, every process with ``server``'s
    credentials and its own scratch directory; torn down after."""
    home = Path(tempfile.mkdtemp(prefix="crmn", dir="/tmp"))  # Ray's socket paths stay short
    ours = {"CRUCIBLE_HOME": str(home), "CRUCIBLE_SCRATCH": str(home / "scratch-head")}
    saved = {k: os.environ.get(k) for k in [*RAY_ENV, *server.env, *ours]}
    os.environ.update(RAY_ENV | server.env | ours)
    cluster = None
    try:
        # the head on an address of its own, as on a real cluster (nodes join it there)
        state, started = local.up(home / "cluster", local.free_ports(), num_cpus=1,
                                  node_ip=HEAD_IP, rule_files=rule_files(),
                                  scrape_interval_s=SCRAPE_INTERVAL_S)  # fmt: skip
        assert started
        # the client (this process) is not a node: a scratch of its own
        os.environ["CRUCIBLE_SCRATCH"] = str(home / "scratch-client")
        cluster = Cluster(home, state, server.env)
        cluster.roots["head"] = next(p.pid for p in state.procs if p.name == "ray")
        for name, ip in nodes.items():
            cluster.join(name, ip)
        cluster.wait_nodes({"head", *nodes})
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import shutil

        shutil.rmtree(home, ignore_errors=True)


# --- the drill ------------------------------------------------------------------------------

EVERY, KILL_AFTER = 6, 6
# The node-loss run trains until the drill has seen what it checks (node b scraped and killed
# after a checkpoint, node c's rank scraped SCRAPES times), then stops it as a user does
# (``crucible jobs stop``): how many steps fit into Prometheus' discovery and scrapes depends
# on the machine, so its length is set by what happened, not by a step count.
# Far more than it runs (about 20 here), yet a bound: should the drill die before stopping
# the run, the job still ends within minutes.
MAX_STEPS = 1000
SCRAPES = 3


@dataclass
class Drill:
    """What the drill did and saw."""

    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    started: float = 0.0  # unix time the drill began (for Prometheus range queries)
    data_run: str = ""
    ref_run: str = ""
    run: str = ""
    placements: dict[str, dict[int, str]] = field(default_factory=dict)
    nodes_before: dict[str, tuple[str, str]] = field(default_factory=dict)
    nodes_after: dict[str, tuple[str, str]] = field(default_factory=dict)
    replaced_s: float = 0.0
    kill_after: int = 0  # the checkpoint node b was killed after (KILL_AFTER or later)
    last_step: int = 0  # the node-loss run's last step (where the drill stopped it)
    export_dir: str = ""
    logs: dict[str, str] = field(default_factory=dict)


def _timed(drill: Drill, phase: str) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def timer() -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            drill.phases[phase] = time.monotonic() - t0

    return timer()


def _wait_for(check: Callable[[], Any], what: str, done: threading.Event, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: {'the job ended first' if done.is_set() else 'timed out'}")


def placement(
    cluster: Cluster, run: Location, done: threading.Event, old: dict[int, int] | None = None
) -> tuple[dict[int, int], dict[int, str]]:
    """Wait for both ranks' live pids (other than ``old``) and their nodes; return
    ``({rank: pid}, {rank: node})``. The pids come from the run's storage, like any file."""

    def check() -> tuple[dict[int, int], dict[int, str]] | None:
        pids, where = {}, {}
        for rank in (0, 1):
            with contextlib.suppress(OSError, ValueError):
                pids[rank] = int((run / "workers" / f"rank-{rank}.pid").read_text())
            if rank in pids and (old is None or pids[rank] != old[rank]):
                node = cluster.node_of(pids[rank])
                if node is not None:
                    where[rank] = node
        return (pids, where) if len(where) == 2 else None

    return _wait_for(check, f"both workers of {run.name} on known nodes", done)


def run_job(
    spec: Any, during: Callable[[Location, threading.Event, Callable[[], str]], None] | None = None
):
    """Submit ``spec`` as a Ray job with ``during(run, job_ended, stop)`` in a thread (``stop()``
    stops the job as ``crucible jobs stop`` does); wait for both; return (run location, job
    log). Raises if the job did not succeed."""
    from crucible.jobs.stop import stop_job
    from crucible.jobs.submit import submit_run

    client, job_id, run = submit_run(spec)
    ended = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            if during is not None:
                during(run, ended, lambda: stop_job(client, job_id))
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        log = "".join(client.follow(job_id))
    finally:
        ended.set()
        watcher.join(timeout=60)
    status = str(client.status(job_id))
    if not status.endswith("SUCCEEDED"):
        raise AssertionError(f"job {job_id} {status}:\n{log[-5000:]}")
    if errors:
        raise errors[0]
    return run, log


def data_spec(name: str, storage: str, inputs: str) -> Any:
    from crucible.jobs.spec import parse_spec

    return parse_spec(
        {
            "kind": "data",
            "name": name,
            "cluster": {"storage": storage},
            "data": {
                "inputs": [inputs],
                "shards": {
                    "seq_len": 64,
                    "rows_per_shard": 100,
                    "heldout_fraction": 0.05,
                    "tokenizer": {"train": {"vocab_size": 320}},
                },
            },
        }
    )


def train_spec(name: str, storage: str, shards: str, max_steps: int = MAX_STEPS) -> Any:
    from crucible.jobs.spec import parse_spec

    return parse_spec(
        {
            "kind": "train",
            "name": name,
            "cluster": {"storage": storage},
            "model": {"preset": "tiny"},
            "data": {"shards": shards},
            # constant after warm-up: the LR does not depend on max_steps, so the reference
            # trained to the node-loss run's last step has the same schedule
            "optim": {
                "global_batch_size": 16,
                "micro_batch_size": 4,
                "warmup_steps": 4,
                "schedule": "constant",
            },
            "checkpoint": {"every_steps": EVERY, "keep_last": 2},
            "train": {
                "num_workers": 2,
                "max_steps": max_steps,
                "placement_strategy": "STRICT_SPREAD",
                "max_failures": 2,
                "gpu_hour_budget": 1.0,
            },
        }
    )


def upload_corpus(dest: Location, docs: int = 240) -> int:
    """Generate the sample corpus locally and upload it to ``dest``; return its bytes."""
    from crucible.data_pipeline.sample import generate_corpus

    with tempfile.TemporaryDirectory() as tmp:
        generate_corpus(Path(tmp), n_docs=docs, seed=5, files=3)
        total = 0
        for p in sorted(Path(tmp).iterdir()):
            total += int((dest / p.name).upload(p)["bytes"])
    return total


def run_drill(cluster: Cluster, server: S3Server, workdir: Path, reference: bool = True) -> Drill:
    """The whole drill on ``cluster`` (head + node b); see the module docstring.

    Args:
        cluster: a :func:`multinode` cluster with node ``b``.
        server: the object store.
        workdir: a local directory for the export.
        reference: also train an uninterrupted run, to compare the resumed one with.
    """
    from crucible.jobs.train.export import export_checkpoint

    drill = Drill(started=time.time())
    bucket = server.bucket("drill")
    storage = f"{bucket}/runs"
    with _timed(drill, "upload raw text"):
        upload_corpus(location(f"{bucket}/raw"))
    with _timed(drill, "data job (filters, dedup, shards) to S3"):
        data, log = run_job(data_spec("data", storage, f"{bucket}/raw/"))
    drill.data_run, drill.logs["data"] = data.uri, log
    shards = (data / "shards").uri

    def lose_node_b(run: Location, done: threading.Event, stop: Callable[[], str]) -> None:
        latest = run / "checkpoints" / "latest"

        def committed() -> int | None:
            # the newest committed checkpoint, once it is at least KILL_AFTER
            with contextlib.suppress(OSError, ValueError):
                step = int(latest.read_text().strip().removeprefix("step-"))
                return step if step >= KILL_AFTER else None
            return None

        # Node b's rank must have been scraped before it dies (Prometheus finds a rank through
        # HTTP SD, then scrapes it an interval later): the kill follows that, not a fixed step.
        _wait_for(lambda: scraped(cluster, run.name, "127.0.0.2"), "a scrape of node b", done)
        _wait_for(committed, f"a checkpoint at step {KILL_AFTER}+", done)
        pids, drill.placements["before"] = placement(cluster, run, done)
        drill.nodes_before = cluster.alive()

        def past_newest() -> int | None:
            # A step after the newest checkpoint is durable in the run's log: work the loss
            # destroys, and a record the resumed attempt's re-run of that step is compared
            # with. The log is read first, the pointer after it: a checkpoint committed in
            # between shows as newer than the log, and the check runs again. The kill follows
            # at once (another checkpoint is a save interval away).
            logged = max(step_losses(run), default=0)
            newest = committed()
            return newest if newest is not None and logged > newest else None

        drill.kill_after = _wait_for(past_newest, "a step after the newest checkpoint", done)
        cluster.kill("b")
        killed = time.monotonic()
        cluster.join("c", "127.0.0.3")  # what an autoscaler would do
        drill.placements["after"] = placement(cluster, run, done, old=pids)[1]
        drill.replaced_s = time.monotonic() - killed
        drill.nodes_after = cluster.alive()
        # Scraped several times: the resumed attempt's series (rates, the recording rules
        # built on them) are in Prometheus before the run ends.
        _wait_for(
            lambda: scraped(cluster, run.name, "127.0.0.3", SCRAPES),
            f"{SCRAPES} scrapes of node c", done,
        )  # fmt: skip
        drill.logs["stop"] = stop()

    with _timed(drill, "train, node b killed mid-run, resumed on node c"):
        run, drill.logs["run"] = run_job(train_spec("node-loss", storage, shards), lose_node_b)
    drill.run = run.uri
    drill.last_step = max(step_losses(run))

    if reference:

        def watch_reference(run: Location, done: threading.Event, _: Callable[[], str]) -> None:
            drill.placements["ref"] = placement(cluster, run, done)[1]

        with _timed(drill, "train, uninterrupted (reference)"):
            spec = train_spec("ref", storage, shards, max_steps=drill.last_step)
            ref, drill.logs["ref"] = run_job(spec, watch_reference)
        drill.ref_run = ref.uri

    with _timed(drill, "export from S3 to transformers"):
        drill.export_dir = str(export_checkpoint(run.uri, "hf", workdir / "hf"))
    return drill


def scraped(cluster: Cluster, run: str, ip: str, times: int = 1) -> bool:
    """Whether the cluster's Prometheus has scraped a rank of ``run`` on the host ``ip`` at
    least ``times`` times: Prometheus finds a new rank through HTTP SD and scrapes it one
    interval later, so a rank killed sooner than that leaves no series."""
    expr = f'crucible_train_step_seconds_count{{run="{run}"}}'
    return any(
        instance.rsplit(":", 1)[0] == ip and n >= times
        for instance, _, n in scrape_counts(cluster.state.prometheus_url, expr)
    )


def scrape_counts(url: str, selector: str, window: str = "10m") -> list[tuple[str, float, int]]:
    """Each series of ``selector`` scraped within the last ``window``: its instance, the unix
    time of its first sample there, and its samples (each attempt's exporter, on its own
    port, is a series of its own)."""
    found = prometheus_query(url, f"{selector}[{window}]", time.time())
    return [(s["metric"]["instance"], float(s["values"][0][0]), len(s["values"])) for s in found]


def prometheus_query(url: str, expr: str, at: float) -> list[dict[str, Any]]:
    """``expr`` evaluated at unix time ``at``."""
    r = requests.get(f"{url}/api/v1/query", params={"query": expr, "time": at}, timeout=30)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


RANGE_STEP_S = 5  # a dashboard's step over a run of a few minutes


def prometheus_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """``expr`` evaluated over ``[start, end]`` every :data:`RANGE_STEP_S`, as a dashboard over that time range
    shows it (a finished job's series are stale at the end, not absent from the range)."""
    r = requests.get(
        f"{url}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": RANGE_STEP_S},
        timeout=30,
    )
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def step_losses(run: str | Location) -> dict[int, float]:
    """Loss of each step; after a resume the re-run steps' later records win."""
    return {
        int(r["step"]): r["loss"]
        for r in read_jsonl(location(run) / "metrics.jsonl")
        if r.get("kind") == "step"
    }


def losses_by_attempt(run: str | Location) -> list[dict[int, float]]:
    """Loss of each step, one dict per attempt (split at each ``resume`` record)."""
    out: list[dict[int, float]] = [{}]
    for r in read_jsonl(location(run) / "metrics.jsonl"):
        if r.get("kind") == "resume":
            out.append({})
        elif r.get("kind") == "step":
            out[-1][int(r["step"])] = r["loss"]
    return out


def records(run: str | Location, kind: str) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records of ``kind``."""
    return [r for r in read_jsonl(location(run) / "metrics.jsonl") if r.get("kind") == kind]
