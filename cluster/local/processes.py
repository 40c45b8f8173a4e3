"""The local cluster's processes: finding the ``ray`` and ``prometheus`` binaries, waiting
until a service answers, and stopping exactly the processes ``up`` started and their
descendants (never anything found by name)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from crucible.cluster.local.state import ClusterState
from crucible.errors import CrucibleError


def find_ray() -> str:
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


def wait_http(
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


def wait_ray_sd(ray_temp: Path, timeout: float) -> None:
    sd = ray_temp / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not sd.exists():
        time.sleep(0.5)


def descendants(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def stop_procs(state: ClusterState, timeout: float = 30.0) -> list[int]:
    """Stop every recorded process and its descendants; return pids that had to be killed."""
    killed: list[int] = []
    # Prometheus first (it scrapes Ray), then Ray; each root with what it spawned.
    for rec in sorted(state.procs, key=lambda r: r.name != "prometheus"):
        root = rec.handle()
        if root is None:
            continue
        family = [root, *descendants(root)]
        with contextlib.suppress(psutil.Error):
            root.send_signal(signal.SIGTERM)
        alive = wait_gone(family, timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
        wait_gone(alive, 5)
    state.procs = []
    return killed


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
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
