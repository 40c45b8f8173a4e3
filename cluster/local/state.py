"""What the local cluster records about itself: its ports, the processes ``up`` started (with
their start times) and where its files are, in ``<state>/cluster.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from crucible.cluster.local.token import TOKEN_FILE
from crucible.cluster.storage.files import write_json_file
from crucible.errors import CrucibleError

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"


def default_state_dir() -> Path:
    """``$CRUCIBLE_HOME/cluster`` or ``~/.crucible/cluster``."""
    home = os.environ.get("CRUCIBLE_HOME")
    return (Path(home) if home else Path.home() / ".crucible") / "cluster"


@dataclass
class Ports:
    """The fixed ports of the local cluster (all on 127.0.0.1 where Ray allows it)."""

    gcs: int = 6379
    dashboard: int = 8265
    client_server: int = 10001
    metrics_export: int = 8090
    dashboard_agent: int = 52365
    prometheus: int = 9090
    metrics_discovery: int = 8269  # crucible's target registry (monitoring.discovery)


PORT_NAMES = tuple(Ports.__dataclass_fields__)


def since_boot(p: psutil.Process) -> float:
    """When ``p`` started, in seconds since boot: the kernel's tick count, which a change of
    the wall clock does not move (``create_time()`` is that plus the boot time, which the
    kernel derives from the wall clock and which moves whenever the clock is set or slewed)."""
    return p.create_time() - psutil.boot_time()


@dataclass
class Proc:
    """A process ``up`` started: pid plus start time, to never signal a recycled pid."""

    name: str
    pid: int
    create_time: float
    since_boot: float | None = None  # None in state files written before it was recorded

    @classmethod
    def of(cls, name: str, pid: int) -> Proc:
        """The record of running process ``pid``."""
        p = psutil.Process(pid)
        return cls(name, pid, p.create_time(), since_boot(p))

    def handle(self) -> psutil.Process | None:
        try:
            p = psutil.Process(self.pid)
            if self.since_boot is not None:
                # within the boot-time read's 1 s step: a recycled pid started later than that
                same = abs(since_boot(p) - self.since_boot) < 1.5
            else:
                same = abs(p.create_time() - self.create_time) < 1.0
            if same:
                return p
        except psutil.Error:
            pass
        return None


@dataclass
class ClusterState:
    """What ``<state>/cluster.json`` records about a running local cluster."""

    state_dir: str
    ports: Ports
    procs: list[Proc] = field(default_factory=list)
    started_at: float = 0.0
    num_cpus: int | None = None
    temp_dir: str = ""
    """The private directory :func:`cluster_temp_dir` that holds Ray's temp dir."""
    node_ip: str = HOST
    """The head's Ray node address: 127.0.0.1 (this machine only) unless ``up`` was given
    another one for nodes to join."""

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's ``--temp-dir``: its sockets, session logs and Prometheus service discovery."""
        if not self.temp_dir:  # a cluster started before Ray's temp dir left the state dir
            return Path(self.state_dir) / "ray"
        return Path(self.temp_dir) / "ray"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports.dashboard}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.ports.prometheus}"

    @property
    def token_path(self) -> Path:
        return Path(self.state_dir) / TOKEN_FILE

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.handle() is not None]


def load_state(state_dir: Path) -> ClusterState | None:
    """The recorded state of the cluster in ``state_dir``, or None if none was started."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return ClusterState(
            state_dir=raw["state_dir"],
            ports=Ports(**{k: v for k, v in raw["ports"].items() if k in PORT_NAMES}),
            procs=[Proc(**p) for p in raw.get("procs", [])],
            started_at=raw.get("started_at", 0.0),
            num_cpus=raw.get("num_cpus"),
            temp_dir=raw.get("temp_dir", ""),
            node_ip=raw.get("node_ip", HOST),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CrucibleError(
            f"{path} is unreadable ({e}); stop any processes it listed and remove the file"
        ) from None


def save_state(state: ClusterState) -> None:
    """Record ``state`` in ``<state>/cluster.json`` (atomically and durably)."""
    write_json_file(Path(state.state_dir) / STATE_FILE, asdict(state))
