"""The local embedded cluster, for real: Ray head with token auth, Prometheus, clean shutdown."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from crucible.cluster import local
from crucible.cluster.local import ports as local_ports
from crucible.cluster.local import tempdir
from crucible.cluster.spec import ClusterSpec
from crucible.errors import CrucibleError
from crucible.jobs.client import JobsClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_ports, short_tmpdir


def crucible_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crucible", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.slow
def test_lifecycle_submit_auth_prometheus_and_down() -> None:
    """up → job through the crucible client → 401 without token → Prometheus sees Ray → down."""
    state_dir = short_tmpdir("crl") / "cluster"
    ports = free_ports()
    state, started = local.up(state_dir, ports, num_cpus=1)
    try:
        assert started
        token = (state_dir / "auth_token").read_text()
        assert (state_dir / "auth_token").stat().st_mode & 0o777 == 0o600
        # The token never reaches a command line of a process we started.
        for rec in state.procs:
            p = rec.handle()
            assert p is not None
            for proc in [p, *p.children(recursive=True)]:
                try:
                    assert token not in " ".join(proc.cmdline())
                    assert token not in "".join(proc.environ().values())
                except psutil.NoSuchProcess:
                    pass

        # A second `up` says so and changes nothing.
        again, started_again = local.up(state_dir, ports)
        assert not started_again and [p.pid for p in again.procs] == [p.pid for p in state.procs]
        r = crucible_cli("cluster", "up", "--state-dir", str(state_dir))
        assert r.returncode == 0 and "already running" in r.stdout

        # A real job through the crucible client; its logs come back.
        client = JobsClient.for_cluster(ClusterSpec(state_dir=state_dir))
        job = client.submit(
            f'{client.python()} -c "import ray; ray.init(); '
            f"print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))\""
        )
        assert client.wait(job, timeout=180).name == "SUCCEEDED"
        assert "answer 42" in client.logs(job)

        # Without the token the Jobs API refuses; with a wrong one too.
        url = f"{state.dashboard_url}/api/jobs/"
        assert requests.get(url, timeout=10).status_code == 401
        bad = {"Authorization": "Bearer " + "0" * 64}
        assert requests.get(url, headers=bad, timeout=10).status_code in (401, 403)
        assert requests.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # Nothing the cluster started listens beyond loopback: not the dashboard, Prometheus,
        # GCS, raylet, object manager, agents, Ray's metrics port or its client server.
        pids = set()
        for rec in state.procs:
            root = rec.handle()
            assert root is not None
            pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
        listening = {
            (c.laddr.ip, c.laddr.port, c.pid)
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        }
        assert len(listening) > 5
        loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
        assert {ip for ip, _, _ in listening} <= loopback, listening
        for port in (ports.dashboard, ports.prometheus, ports.metrics_export, ports.client_server):
            assert {ip for ip, p, _ in listening if p == port} <= loopback

        # Prometheus scrapes Ray's metrics: a `ray` target reports up.
        deadline = time.monotonic() + 60
        targets: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            targets = local.prometheus_targets(state.prometheus_url)
            if any(t["job"] == "ray" and t["health"] == "up" for t in targets):
                break
            time.sleep(1)
        assert any(t["job"] == "ray" and t["health"] == "up" for t in targets), targets

        r = crucible_cli("cluster", "status", "--state-dir", str(state_dir))
        assert r.returncode == 0 and "ray health" in r.stdout and "ok" in r.stdout

        family = []
        for rec in state.procs:
            p = rec.handle()
            assert p is not None
            family += [p, *p.children(recursive=True)]
        assert len(family) > 5
    finally:
        r = crucible_cli("cluster", "down", "--state-dir", str(state_dir))
    assert r.returncode == 0 and "stopped" in r.stdout
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []
    assert crucible_cli("cluster", "status", "--state-dir", str(state_dir)).returncode == 1
    assert not Path(state.temp_dir).exists()
    shutil.rmtree(state_dir.parent, ignore_errors=True)


def test_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    ports = free_ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.dashboard))
        s.listen()
        state_dir = short_tmpdir("crp") / "cluster"
        r = crucible_cli(
            "cluster", "up", "--state-dir", str(state_dir),
            "--dashboard-port", str(ports.dashboard), "--gcs-port", str(ports.gcs),
            "--prometheus-port", str(ports.prometheus),
        )  # fmt: skip
    assert r.returncode == 2
    assert f"port {ports.dashboard} (dashboard) is already in use" in r.stderr
    assert "--dashboard-port" in r.stderr and "Traceback" not in r.stderr
    assert local.load_state(state_dir) is None


@pytest.mark.slow
def test_a_long_state_dir_keeps_rays_sockets_in_a_short_private_dir(tmp_path: Path) -> None:
    """A state dir of 120 characters (a long home directory): Ray's temp dir, sockets and all,
    goes to a private directory under /tmp, and `down` removes it."""
    state_dir = tmp_path / ("d" * (119 - len(str(tmp_path))))
    assert len(str(state_dir)) == 120
    state, started = local.up(state_dir, free_ports(), num_cpus=1)
    temp = Path(state.temp_dir)
    try:
        assert started and temp == local.cluster_temp_dir(state_dir)
        recorded = local.load_state(state_dir)
        assert recorded is not None and recorded.temp_dir == str(temp)
        st = temp.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()
        assert state.ray_temp_dir.parent == temp and not (state_dir / "ray").exists()

        def sockets() -> dict[str, Path]:
            return {p.name: p for p in state.ray_temp_dir.glob("session_2*/sockets/*")}

        deadline = time.monotonic() + 120  # the raylet may still be starting on a busy machine
        while not {"plasma_store", "raylet"} <= set(sockets()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {"plasma_store", "raylet"} <= set(sockets()), sockets()
        for path in sockets().values():
            assert stat.S_ISSOCK(path.stat().st_mode) and len(str(path)) <= 107, path
        # Prometheus reads Ray's targets there; `status` reads Ray's address there.
        sd = state.ray_temp_dir / "prom_metrics_service_discovery.json"
        assert sd.exists() and str(sd) in (state_dir / "prometheus" / "prometheus.yml").read_text()
        current = state.ray_temp_dir / "ray_current_cluster"  # written once Ray's node is up
        deadline = time.monotonic() + 60
        while not current.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        info = local.status(state_dir)
        assert info["running"] and info["ray"]["healthy"], info
        assert info["ray_address"] == current.read_text().strip()
        assert info["ray_temp_dir"] == str(state.ray_temp_dir)
    finally:
        local.down(state_dir)
    assert not temp.exists()
    assert local.status(state_dir)["running"] is False


def test_cluster_temp_dir_is_short_and_one_per_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    long_dir = tmp_path / ("x" * 200) / ("y" * 200)
    temp = local.cluster_temp_dir(long_dir)
    assert temp == local.cluster_temp_dir(long_dir / ".." / ("y" * 200))  # resolved first
    assert temp.parent == Path("/tmp") and temp.name.startswith(f"crucible-{os.getuid()}-")
    assert local.cluster_temp_dir(tmp_path / "a") != local.cluster_temp_dir(tmp_path / "b")
    # The longest socket path Ray makes under it, with the longest uid, fits in 107 bytes.
    longest = f"{temp}/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
    assert len(longest) - len(str(os.getuid())) + len(str(2**32 - 1)) <= 107

    # $TMPDIR is used where the paths fit there, else /tmp.
    monkeypatch.setattr(tempfile, "tempdir", "/var/tmp")
    assert local.cluster_temp_dir(long_dir) == Path("/var/tmp") / temp.name
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t" / ("z" * 40)))
    assert local.cluster_temp_dir(long_dir) == temp
    # Should even /tmp not fit: one clear error.
    monkeypatch.setattr(tempdir, "MAX_RAY_TEMP_DIR", 20)
    with pytest.raises(CrucibleError, match=r"too long for Ray's socket paths; set \$TMPDIR"):
        local.cluster_temp_dir(long_dir)


def test_private_temp_dir_refuses_what_is_not_a_directory_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private dir lies in /tmp, writable by every user: a symlink, a file or another
    user's directory in its place is refused, and the symlink's target is left as it was."""
    made = tmp_path / "made"
    old_umask = os.umask(0)  # mkdir's mode passes through the umask; the result must not
    try:
        tempdir.make_private_dir(made)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(made.lstat().st_mode) == 0o700
    made.chmod(0o755)
    tempdir.make_private_dir(made)  # ours already: taken, and made private again
    assert stat.S_IMODE(made.lstat().st_mode) == 0o700

    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(CrucibleError, match=re.escape(f"{link} is a symlink;")):
        tempdir.make_private_dir(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755

    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(CrucibleError, match=re.escape(f"{file} is not a directory")):
        tempdir.make_private_dir(file)

    monkeypatch.setattr(os, "getuid", lambda: os.stat(made).st_uid + 1)
    with pytest.raises(
        CrucibleError, match=re.escape(f"{made} belongs to uid ") + ".*, not to you"
    ):
        tempdir.make_private_dir(made)


def test_down_removes_only_the_temp_dir_up_made(tmp_path: Path) -> None:
    """`down` removes the recorded temp dir only if it is the one made for this state dir."""
    state_dir = tmp_path / "cluster"
    state_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = local.ClusterState(str(state_dir), local.Ports(), temp_dir=str(elsewhere))
    local.save_state(state)
    local.down(state_dir)
    assert elsewhere.exists()  # an edited cluster.json does not make `down` remove it

    mine = tmp_path / local.cluster_temp_dir(state_dir).name
    (mine / "ray" / "session_x").mkdir(parents=True)
    local.save_state(local.ClusterState(str(state_dir), local.Ports(), temp_dir=str(mine)))
    local.down(state_dir)
    assert not mine.exists()


def test_missing_prometheus_binary_is_a_clear_error() -> None:
    state_dir = short_tmpdir("crm") / "cluster"
    r = crucible_cli(
        "cluster", "up", "--state-dir", str(state_dir), "--prometheus-bin", "/nonexistent/prom"
    )
    assert r.returncode == 2 and "prometheus is not installed" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_address_is_a_clear_error() -> None:
    port = local.free_port()
    with pytest.raises(CrucibleError, match=f"127.0.0.1:{port} does not answer"):
        JobsClient.for_cluster(ClusterSpec(address=f"http://127.0.0.1:{port}"))
    with pytest.raises(CrucibleError, match="no local cluster is running"):
        JobsClient.for_cluster(ClusterSpec(state_dir=short_tmpdir("crn")))
    with pytest.raises(CrucibleError, match="is not 'local' or a dashboard URL"):
        JobsClient.for_cluster(ClusterSpec(address="ray://x:10001"))


@pytest.mark.slow  # starts the session cluster
def test_session_cluster_accepts_jobs(local_cluster: local.ClusterState) -> None:
    client = JobsClient.for_cluster(ClusterSpec(state_dir=Path(local_cluster.state_dir)))
    job = client.submit(f"{client.python()} -c \"print('hello from a job')\"")
    assert client.wait(job, timeout=120).name == "SUCCEEDED"
    assert "hello from a job" in client.logs(job)


def test_a_port_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    """After `cluster down` the servers' closed connections sit in TIME_WAIT for a minute;
    `cluster up` right after must not call their ports taken (the servers bind with
    SO_REUSEADDR)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not local_ports.port_free(port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server closes first: its side goes to TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    assert local_ports.port_free(port)
