"""The local embedded cluster: a token-authenticated Ray head and a Prometheus beside it.

``up`` starts ``ray start --head --block`` and ``prometheus`` as children in their own
sessions, waits until both answer, and records their pids (with process start times, so a
recycled pid is never mistaken for ours) in ``<state>/cluster.json``. ``down`` stops exactly
those processes and their descendants, never anything found by name. The Ray auth token is
generated into ``<state>/auth_token`` with mode 0600; it is passed to Ray as a path
(``RAY_AUTH_TOKEN_PATH``), so it never appears in a command line, an environment listing or
a log. Once up, the daemons (everything but the raylet and the workers it starts) run at
niceness :data:`DAEMON_NICENESS`, below the training ranks.

Ray's user-facing HTTP services (dashboard and Jobs API, client server) and Prometheus bind to
127.0.0.1. Ray's internal gRPC services (GCS, raylet, object manager) bind to the node address
Ray picks itself (Ray maps a loopback ``--node-ip-address`` to the routable one) and are
protected by the same token.

Ray's temp dir (its unix sockets and session logs) is not in the state directory but in a
private directory under /tmp named after it (:func:`cluster_temp_dir`), so that Ray's socket
paths stay short whatever the home directory; ``down`` removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from crucible.errors import CrucibleError

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
# Ray puts unix sockets under its temp dir, at
# <temp>/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid, up to 7 digits>/sockets/plasma_store,
# and a socket path holds at most 107 bytes.
_MAX_RAY_TEMP_DIR = 107 - len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
# Nice value of the cluster's daemons: GCS, dashboard and its module processes, the agents,
# the monitors and Prometheus. The raylet keeps the caller's priority, and so do the
# processes it starts (training ranks ask Ray for niceness 0, see jobs/train/run.py): on a
# node with no spare core, a daemon waking at normal priority preempts a rank, and every
# other rank waits for it at the next collective. 15 is what Ray gives its own task workers.
DAEMON_NICENESS = 15
# The raylet's children that are daemons, not workers.
_RAYLET_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


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


_PORT_NAMES = tuple(Ports.__dataclass_fields__)


@dataclass
class Proc:
    """A process ``up`` started: pid plus create time, to never signal a recycled pid."""

    name: str
    pid: int
    create_time: float

    def handle(self) -> psutil.Process | None:
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) < 1.0:
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
            ports=Ports(**{k: v for k, v in raw["ports"].items() if k in _PORT_NAMES}),
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


def _save_state(state: ClusterState) -> None:
    path = Path(state.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


def _temp_dir_name(state_dir: Path) -> str:
    digest = hashlib.sha256(str(state_dir.expanduser().resolve()).encode()).hexdigest()
    return f"crucible-{os.getuid()}-{digest[:10]}"


def cluster_temp_dir(state_dir: Path) -> Path:
    """The private directory that holds Ray's temp dir (its ``ray`` subdirectory) for the
    cluster in ``state_dir``: ``crucible-<uid>-<sha256 of the state dir, 10 hex>`` in the
    system temp dir (``$TMPDIR``) if Ray's socket paths fit there, else in /tmp, where Ray's
    own default ``/tmp/ray`` lives. A function of the state dir, so ``up`` and ``down`` agree
    and two clusters never share one.

    Args:
        state_dir: the cluster's state directory (resolved here).
    """
    name = _temp_dir_name(state_dir)
    candidates = [Path(tempfile.gettempdir()) / name, Path("/tmp") / name]
    for path in candidates:
        if len(str(path / "ray")) <= _MAX_RAY_TEMP_DIR:
            return path
    raise CrucibleError(
        f"Ray's temp dir {candidates[-1] / 'ray'} would be longer than {_MAX_RAY_TEMP_DIR} "
        "characters, too long for Ray's socket paths; set $TMPDIR to a shorter directory"
    )


def _make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or take it if it is already a directory of ours.

    It lies where every user may write: a symlink, a file or a directory of someone else's
    found there is refused, never followed. Ray makes its own temp dir world-writable, which
    is why that is a subdirectory of this one.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CrucibleError(f"cannot create {path} for Ray's temp dir: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        _refuse_temp_dir(path, path.lstat())
        raise CrucibleError(f"cannot open {path} for Ray's temp dir: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        _refuse_temp_dir(path, st)
        if stat.S_IMODE(st.st_mode) != 0o700:  # mkdir's mode went through the umask
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _refuse_temp_dir(path: Path, st: os.stat_result) -> None:
    """Raise the clear error for ``path`` (whose status is ``st``) unless it is our directory."""
    if stat.S_ISLNK(st.st_mode):
        what = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        what = "is not a directory"
    elif st.st_uid != os.getuid():
        what = f"belongs to uid {st.st_uid}, not to you"
    else:
        return
    raise CrucibleError(
        f"{path} {what}; crucible keeps Ray's temp dir there: have it removed, or set $TMPDIR "
        "to a directory of your own"
    )


def _remove_temp_dir(state: ClusterState) -> None:
    """Remove the private temp dir ``up`` made for this cluster, and nothing else: a recorded
    path that is not this state dir's, or no longer a directory of ours, is left alone."""
    if not state.temp_dir:
        return
    path = Path(state.temp_dir)
    if path.name != _temp_dir_name(Path(state.state_dir)):
        return
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise CrucibleError(
            f"the cluster is stopped, but its Ray temp dir {path} could not be removed "
            f"({e.strerror}); remove it by hand"
        ) from None


def ensure_token(state_dir: Path) -> Path:
    """Create the auth token file (mode 0600) if missing; return its path."""
    path = state_dir / TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CrucibleError(f"{path} is readable by others (mode {mode:o}); run chmod 600 {path}")
    return path


def read_token(path: Path) -> str:
    """Read a token file; the token itself is never printed."""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise CrucibleError(f"cannot read the Ray auth token at {path}: {e.strerror}") from None


def auth_headers(token_path: Path) -> dict[str, str]:
    """HTTP headers that authenticate to a token-protected Ray dashboard."""
    return {"Authorization": f"Bearer {read_token(token_path)}"}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as every server here binds: connections a stopped server closed linger
        # in TIME_WAIT for a minute and would otherwise make its port look taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Ray's GCS and metrics agent bind to all interfaces: refuse those ports taken there too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port that is free on 127.0.0.1 now (for tests and ad-hoc servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports() -> Ports:
    """A full set of distinct ports that are free now (for tests and benchmarks, so they never
    collide with a user's cluster)."""
    names = list(_PORT_NAMES)
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        p = free_port()
        if p not in ports.values():
            ports[names[len(ports)]] = p
    return Ports(**ports)


# Ray's workers take ports from this range (Ray's defaults); fixed ports must stay outside.
WORKER_PORTS = range(10002, 20000)


def _check_ports(ports: Ports) -> None:
    seen: dict[int, str] = {}
    for name, port in asdict(ports).items():
        flag = "--" + name.replace("_", "-") + "-port"
        if port in WORKER_PORTS:
            raise CrucibleError(
                f"{flag} {port} is inside Ray's worker port range 10002-19999; choose a port "
                "outside it"
            )
        if port in seen:
            raise CrucibleError(f"{flag} {port} is also the {seen[port]} port; choose another")
        seen[port] = name.replace("_", " ")
        if not _port_free(port):
            raise CrucibleError(
                f"port {port} ({name.replace('_', ' ')}) is already in use; "
                f"free it or choose another with {flag}"
            )


def _find_ray() -> str:
    ray = Path(sys.executable).parent / "ray"
    if ray.exists():
        return str(ray)
    found = shutil.which("ray")
    if not found:
        raise CrucibleError("the `ray` command is not installed; pip install 'ray[default]'")
    return found


def find_prometheus(binary: str | None = None) -> str:
    """The prometheus binary: the given path, $CRUCIBLE_PROMETHEUS, or the one on PATH."""
    candidate = binary or os.environ.get("CRUCIBLE_PROMETHEUS") or shutil.which("prometheus")
    if not candidate or not Path(candidate).exists():
        raise CrucibleError(
            "prometheus is not installed; install it (Debian/Ubuntu: apt-get install "
            "prometheus) or pass --prometheus-bin PATH"
        )
    return candidate


def _wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise CrucibleError(
                f"{what} exited with code {proc.returncode} while starting; see {log}"
                + (f" (last line: {tail[-1].strip()})" if tail else "")
            )
        try:
            r = requests.get(url, headers=headers, timeout=2)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise CrucibleError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log}")


def prometheus_config(state: ClusterState, scrape_interval_s: float = 5.0) -> str:
    """The generated Prometheus config: crucible's exporters by HTTP service discovery from
    the cluster's target registry, Ray's metrics agents by Ray's discovery file (see
    :func:`crucible.monitoring.discovery.scrape_config`, the same for every cluster)."""
    from crucible.monitoring.discovery import PATH, scrape_config

    config = scrape_config(
        f"http://{state.node_ip}:{state.ports.metrics_discovery}{PATH}",
        ray_sd_file=str(state.ray_temp_dir / "prom_metrics_service_discovery.json"),
        scrape_interval_s=scrape_interval_s,
        rule_files=[str(Path(state.state_dir) / "prometheus" / "rules" / "*.yml")],
        extra=[
            {"job_name": "prometheus",
             "static_configs": [{"targets": [f"{HOST}:{state.ports.prometheus}"]}]}
        ],
    )  # fmt: skip
    return "# Generated by `crucible cluster up`; rewritten at every start.\n" + yaml.safe_dump(
        config, sort_keys=False
    )


def up(
    state_dir: Path | None = None,
    ports: Ports | None = None,
    num_cpus: int | None = None,
    prometheus_bin: str | None = None,
    timeout: float = 120.0,
    node_ip: str | None = None,
) -> tuple[ClusterState, bool]:
    """Start the local cluster; return its state and whether it was started now.

    A cluster already running in ``state_dir`` is left as it is (returned with False).

    Args:
        state_dir: the state directory.
        ports: the fixed ports.
        num_cpus: CPUs Ray may use (default: all).
        prometheus_bin: the prometheus binary.
        timeout: seconds to wait for each service.
        node_ip: None (the default): a cluster of this machine alone, every Ray service on
            127.0.0.1. An address (not 127.0.0.1): a head other nodes can join, its Ray
            services on that address (the multi-node tests join nodes on 127.0.0.x).
    """
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    existing = load_state(state_dir)
    if existing is not None and existing.alive():
        return existing, False
    ports = ports or Ports()
    temp_dir = cluster_temp_dir(state_dir)
    prom = find_prometheus(prometheus_bin)
    ray = _find_ray()
    _check_ports(ports)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "prometheus" / "rules").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CrucibleError(
            f"cannot create the state directory {state_dir}: {e.strerror}"
        ) from None
    os.chmod(state_dir, 0o700)
    token_path = ensure_token(state_dir)
    _make_private_dir(temp_dir)
    state = ClusterState(
        state_dir=str(state_dir),
        ports=ports,
        started_at=time.time(),
        num_cpus=num_cpus,
        temp_dir=str(temp_dir),
        node_ip=node_ip or HOST,
    )
    ray_temp = state.ray_temp_dir

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Where the jobs' drivers serve crucible's scrape targets (monitoring.discovery).
        CRUCIBLE_METRICS_SD_PORT=str(ports.metrics_discovery),
    )
    env.pop("RAY_AUTH_TOKEN", None)
    if node_ip is None:
        # A cluster of this machine alone: Ray keeps 127.0.0.1 as the node address instead of
        # mapping it to the routable one, so every service it starts (GCS, raylet, object
        # manager, agents, its metrics port, the client server) binds loopback. This is Ray's
        # switch for single-machine clusters on Windows and macOS; 0 on Linux means the same.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray drains a node for up to 30 s on SIGTERM, for Serve traffic; crucible runs no Serve,
    # so `down` stops at once.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    cmd = [
        ray, "start", "--head", "--block",
        "--node-ip-address", state.node_ip,
        "--port", str(ports.gcs),
        "--dashboard-host", HOST,
        "--dashboard-port", str(ports.dashboard),
        "--ray-client-server-port", str(ports.client_server),
        "--metrics-export-port", str(ports.metrics_export),
        "--dashboard-agent-listen-port", str(ports.dashboard_agent),
        "--temp-dir", str(ray_temp),
        "--disable-usage-stats",
        "--log-style", "record",
    ]  # fmt: skip
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    ray_log = state_dir / "ray.log"
    with open(ray_log, "ab") as log:
        ray_proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    state.procs.append(Proc("ray", ray_proc.pid, psutil.Process(ray_proc.pid).create_time()))
    _save_state(state)
    try:
        _wait_http(
            f"{state.dashboard_url}/api/version", ray_proc, ray_log, "ray head", timeout,
            headers=auth_headers(token_path),
        )  # fmt: skip
        _wait_ray_sd(ray_temp, timeout)

        prom_dir = state_dir / "prometheus"
        (prom_dir / "prometheus.yml").write_text(prometheus_config(state))
        from crucible.monitoring.prometheus import install_rules

        install_rules(state_dir)  # recording and alerting rules, loaded at start
        prom_log = state_dir / "prometheus.log"
        with open(prom_log, "ab") as log:
            prom_proc = subprocess.Popen(
                [
                    prom,
                    f"--config.file={prom_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={prom_dir / 'data'}",
                    f"--web.listen-address={HOST}:{ports.prometheus}",
                    "--web.enable-lifecycle",
                    "--storage.tsdb.retention.time=30d",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        state.procs.append(
            Proc("prometheus", prom_proc.pid, psutil.Process(prom_proc.pid).create_time())
        )
        _save_state(state)
        _wait_http(f"{state.prometheus_url}/-/ready", prom_proc, prom_log, "prometheus", timeout)
        lower_daemon_priority(state)
    except BaseException:
        _stop_procs(state)
        _save_state(state)
        raise
    return state, True


def lower_daemon_priority(
    state: ClusterState, niceness: int = DAEMON_NICENESS, agent_wait_s: float = 10.0
) -> None:
    """Set the cluster's daemons to ``niceness`` (see :data:`DAEMON_NICENESS`); the raylet
    and the workers it starts keep theirs. A process already nicer keeps its value.

    The raylet starts its agents shortly after it answers: they are waited for (at most
    ``agent_wait_s``) by the titles Ray gives them once running.
    """
    daemons: list[psutil.Process] = []
    for rec in state.procs:
        root = rec.handle()
        if root is None:
            continue
        for p in [root, *_descendants(root)]:
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet":
                    daemons += _raylet_agents(p, agent_wait_s)
                elif not any(a.name() == "raylet" for a in p.parents()):
                    daemons.append(p)
    for p in daemons:
        renice_threads(p.pid, niceness)


def renice_threads(pid: int, niceness: int) -> None:
    """Set every thread of process ``pid`` to at least ``niceness``.

    On Linux a nice value belongs to a thread: ``setpriority`` on a pid (what ``renice`` and
    ``psutil.Process.nice`` do) changes the main thread only, and a daemon's worker threads
    (GCS's gRPC and event loops, Prometheus's Go threads) keep running at the old priority.
    Threads started later inherit the value of the thread that starts them, so the pass
    repeats until it finds no thread to change.
    """
    for _ in range(5):
        changed = False
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # the process exited, or not Linux
            tids = [pid]
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that exited meanwhile
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                    changed = True
        if not changed:
            return


def _raylet_agents(raylet: psutil.Process, wait_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + wait_s
    while True:
        agents = []
        for c in raylet.children():
            with contextlib.suppress(psutil.Error):
                if _title(c) in _RAYLET_DAEMONS:
                    agents.append(c)
        if len(agents) >= len(_RAYLET_DAEMONS) or time.monotonic() > deadline:
            return agents
        time.sleep(0.1)


def _title(p: psutil.Process) -> str:
    """The process title Ray sets (``ray::DashboardAgent``, padded with spaces)."""
    return " ".join(p.cmdline()).strip()


def _wait_ray_sd(ray_temp: Path, timeout: float) -> None:
    sd = ray_temp / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not sd.exists():
        time.sleep(0.5)


def _descendants(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _stop_procs(state: ClusterState, timeout: float = 30.0) -> list[int]:
    """Stop every recorded process and its descendants; return pids that had to be killed."""
    killed: list[int] = []
    # Prometheus first (it scrapes Ray), then Ray; each root with what it spawned.
    for rec in sorted(state.procs, key=lambda r: r.name != "prometheus"):
        root = rec.handle()
        if root is None:
            continue
        family = [root, *_descendants(root)]
        with contextlib.suppress(psutil.Error):
            root.send_signal(signal.SIGTERM)
        alive = _wait_gone(family, timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
        _wait_gone(alive, 5)
    state.procs = []
    return killed


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return the ones still running after ``timeout``.

    A process that exited but whose parent has not reaped it yet (a zombie: the parent may be
    the very process calling ``down``) counts as gone, and is reaped here if it is our child.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(p.pid, os.WNOHANG)
                    continue
                alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def down(state_dir: Path | None = None) -> tuple[ClusterState | None, int]:
    """Stop the local cluster in ``state_dir``; return its former state and processes stopped."""
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    state = load_state(state_dir)
    if state is None:
        return None, 0
    n = len(state.alive())
    _stop_procs(state)
    _save_state(state)
    _remove_temp_dir(state)
    return state, n


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """Health of the local cluster: processes, Ray, Prometheus targets, jobs."""
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    state = load_state(state_dir)
    info: dict[str, Any] = {"state_dir": str(state_dir), "running": False}
    if state is None:
        return info
    alive = {p.name for p in state.alive()}
    info.update(
        running=bool(alive),
        processes={p.name: (p.pid if p.name in alive else None) for p in state.procs},
        dashboard=state.dashboard_url,
        prometheus=state.prometheus_url,
        ray_address=_ray_address(state),
        ray_temp_dir=str(state.ray_temp_dir),
        started_at=state.started_at,
    )
    if "ray" in alive:
        info["ray"] = _ray_health(state)
    if "prometheus" in alive:
        info["targets"] = prometheus_targets(state.prometheus_url)
    return info


def _ray_address(state: ClusterState) -> str:
    """The GCS address Ray registered (its node address, not necessarily loopback)."""
    current = state.ray_temp_dir / "ray_current_cluster"
    try:
        return current.read_text().strip()
    except OSError:
        return f"{state.node_ip}:{state.ports.gcs}"


def _ray_health(state: ClusterState) -> dict[str, Any]:
    headers = auth_headers(state.token_path)
    out: dict[str, Any] = {}
    try:
        r = requests.get(f"{state.dashboard_url}/api/jobs/", headers=headers, timeout=5)
        r.raise_for_status()
        jobs = r.json()
        out["healthy"] = True
        out["jobs"] = [
            {
                "id": j.get("submission_id") or j.get("job_id"),
                "status": j.get("status"),
                "entrypoint": j.get("entrypoint", "")[:80],
            }
            for j in jobs
            if j.get("status") in ("PENDING", "RUNNING")
        ]
    except (requests.RequestException, ValueError) as e:
        out["healthy"] = False
        out["error"] = type(e).__name__
    try:
        r = requests.get(f"{state.dashboard_url}/api/v0/nodes", headers=headers, timeout=5)
        nodes = r.json()["data"]["result"]["result"]
        out["nodes"] = sum(1 for n in nodes if n.get("state") == "ALIVE")
    except (requests.RequestException, ValueError, KeyError):
        pass
    return out


def prometheus_targets(prometheus_url: str) -> list[dict[str, str]]:
    """Active scrape targets of a Prometheus: job, address, health."""
    try:
        r = requests.get(f"{prometheus_url}/api/v1/targets", timeout=5)
        r.raise_for_status()
        active = r.json()["data"]["activeTargets"]
    except (requests.RequestException, ValueError, KeyError):
        return []
    return [
        {
            "job": t["labels"].get("job", ""),
            "instance": t["labels"].get("instance", ""),
            "health": t.get("health", "unknown"),
        }
        for t in active
    ]
