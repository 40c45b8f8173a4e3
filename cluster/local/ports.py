"""The local cluster's fixed ports: free ones for tests and benchmarks, and the checks that
refuse a taken port or one inside Ray's worker range before anything starts."""

from __future__ import annotations

import socket
from dataclasses import asdict

from crucible.cluster.local.state import HOST, PORT_NAMES, Ports
from crucible.errors import CrucibleError


def port_free(port: int) -> bool:
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
    names = list(PORT_NAMES)
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        p = free_port()
        if p not in ports.values():
            ports[names[len(ports)]] = p
    return Ports(**ports)


# Ray's workers take ports from this range (Ray's defaults); fixed ports must stay outside.
WORKER_PORTS = range(10002, 20000)


def check_ports(ports: Ports) -> None:
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
        if not port_free(port):
            raise CrucibleError(
                f"port {port} ({name.replace('_', ' ')}) is already in use; "
                f"free it or choose another with {flag}"
            )
