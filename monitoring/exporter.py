"""Serve a process's metrics over HTTP and announce it to the cluster's Prometheus.

Each exporting process (a training rank, a data-pipeline driver) runs a prometheus-client HTTP
server and adds itself to the file-SD list ``<state>/prometheus/crucible_targets.json`` that
the local cluster's Prometheus watches, with labels ``run``, ``job`` and ``rank`` so that every
series it scrapes carries them. The list is rewritten atomically under a file lock; entries of
processes that died without deregistering are pruned on the next registration (each entry
keeps its pid in a ``__``-label, which Prometheus drops after discovery).

Metrics never stop a job: a port that cannot be bound or an unwritable discovery file is
logged once and the caller gets ``None``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

SD_FILE = "crucible_targets.json"
STATE_ENV = "CRUCIBLE_CLUSTER_STATE"
_PID_LABEL = "__crucible_pid"
_HOST_LABEL = "__crucible_host"

_servers: dict[int, tuple[Any, Path | None]] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def sd_path(state_dir: Path | str | None = None) -> Path | None:
    """The cluster's file-SD list: ``<state>/prometheus/crucible_targets.json``.

    Args:
        state_dir: the local cluster's state directory (default ``$CRUCIBLE_CLUSTER_STATE``,
            which the cluster sets for every process it starts); None if neither is set.
    """
    state = state_dir or os.environ.get(STATE_ENV)
    return Path(state) / "prometheus" / SD_FILE if state else None


def _read_targets(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [g for g in data if isinstance(g, dict)] if isinstance(data, list) else []


def _alive_here(group: dict[str, Any]) -> bool:
    labels = group.get("labels", {})
    if labels.get(_HOST_LABEL) != socket.gethostname():
        return True  # another machine's process: not ours to judge
    try:
        return psutil.pid_exists(int(labels.get(_PID_LABEL, -1)))
    except ValueError:
        return False


def _rewrite(path: Path, edit: Any) -> None:
    """Apply ``edit(groups) -> groups`` to the SD file atomically, under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=10):
        groups = edit(_read_targets(path))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(groups, indent=1) + "\n")
        tmp.replace(path)  # Prometheus sees the old or the new list, never half of one


def register_target(
    path: Path, address: str, labels: dict[str, str], pid: int | None = None
) -> None:
    """Add ``address`` with ``labels`` to the SD file, pruning entries of dead processes.

    Args:
        path: the file-SD JSON.
        address: ``host:port`` Prometheus scrapes.
        labels: target labels (run, job, rank).
        pid: the owning process (default: this one).
    """
    entry = {
        "targets": [address],
        "labels": {
            **labels,
            _PID_LABEL: str(pid or os.getpid()),
            _HOST_LABEL: socket.gethostname(),
        },
    }
    _rewrite(
        path,
        lambda gs: (
            [g for g in gs if address not in g.get("targets", []) and _alive_here(g)] + [entry]
        ),
    )


def deregister_target(path: Path, address: str) -> None:
    """Remove ``address`` from the SD file.

    Args:
        path: the file-SD JSON.
        address: ``host:port`` to remove.
    """
    _rewrite(path, lambda gs: [g for g in gs if address not in g.get("targets", [])])


def start_exporter(
    run: str,
    role: str,
    rank: int,
    registry: CollectorRegistry,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    state_dir: Path | str | None = None,
) -> int | None:
    """Serve ``registry`` on ``host:port`` and register it for the cluster's Prometheus.

    Never raises for operational failures: a port that cannot be bound returns None (logged
    once); an unwritable discovery file leaves the exporter up but unannounced (logged once).
    The target is removed again by :func:`stop_exporter` or at interpreter exit.

    Args:
        run: run name (label ``run``).
        role: job kind, e.g. ``train`` or ``data`` (label ``job``).
        rank: worker rank (label ``rank``).
        registry: the metrics to serve (e.g. ``TrainMetrics.registry``).
        port: port to bind; 0 picks a free one.
        host: address to bind and announce.
        state_dir: the cluster's state directory (default ``$CRUCIBLE_CLUSTER_STATE``).

    Returns:
        The bound port, or None if nothing is served.
    """
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        _warn_once(f"bind:{port}", "metrics exporter cannot bind %s:%s (%s); training continues "
                   "without it", host, port, e.strerror or e)  # fmt: skip
        return None
    bound = int(server.server_address[1])
    path = sd_path(state_dir)
    if path is not None:
        try:
            register_target(path, f"{host}:{bound}", {"run": run, "job": role, "rank": str(rank)})
        except (OSError, Timeout) as e:
            _warn_once(f"sd:{path}", "cannot register metrics target in %s (%s)", path, e)
            path = None
    with _lock:
        _servers[bound] = (server, path)
    return bound


def stop_exporter(port: int) -> None:
    """Stop the exporter on ``port`` and remove its discovery entry (no-op if unknown).

    Args:
        port: as returned by :func:`start_exporter`.
    """
    with _lock:
        server, path = _servers.pop(port, (None, None))
    if server is None:
        return
    if path is not None:
        address = f"{server.server_address[0]}:{port}"
        with contextlib.suppress(OSError, Timeout):
            deregister_target(path, address)
    server.shutdown()
    server.server_close()


@atexit.register
def _stop_all() -> None:
    for port in list(_servers):
        with contextlib.suppress(Exception):
            stop_exporter(port)
