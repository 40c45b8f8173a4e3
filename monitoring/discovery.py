"""How Prometheus finds every crucible exporter on every node of any Ray cluster.

One mechanism, the same on the local cluster, on a launcher cluster and on KubeRay: every
exporting process (a training rank, a data job's driver) serves its metrics on its node's Ray
address (``ray.util.get_node_ip_address()``: 127.0.0.1 on the local cluster, the node's own
address elsewhere) and registers ``host:port`` with its labels in the cluster's target
registry. The registry is one named, detached Ray actor on the head node that serves the list
over Prometheus' HTTP service discovery (``http_sd_configs``) at ``http://<head>:<port>/targets``,
the way Ray's head writes a discovery file for its own per-node metrics agents. It probes
every target and drops one that stops answering, so a killed process leaves no stale target.

The port is ``$CRUCIBLE_METRICS_SD_PORT`` on the head (the local cluster sets a free one;
generated cluster configs set it), else :data:`DEFAULT_PORT`. Drivers, which Ray Jobs runs on
the head node, create the registry; exporters only look it up. Nothing here ever raises into
a job: without Ray or without a registry, an exporter serves its metrics unannounced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from crucible.cluster.scrape import DEFAULT_PORT, PATH, PORT_ENV, scrape_config

log = logging.getLogger(__name__)

NAME = "crucible_metrics_targets"
NAMESPACE = "crucible"


def sd_port() -> int:
    """The registry's HTTP port: ``$CRUCIBLE_METRICS_SD_PORT`` or :data:`DEFAULT_PORT`."""
    try:
        return int(os.environ.get(PORT_ENV) or DEFAULT_PORT)
    except ValueError:
        return DEFAULT_PORT


def node_address() -> str:
    """This process's node address as Ray knows it (127.0.0.1 outside Ray)."""
    try:
        import ray
    except ImportError:  # a rank under torchrun on a host without Ray
        return "127.0.0.1"

    if not ray.is_initialized():
        return "127.0.0.1"
    return str(ray.util.get_node_ip_address())


class _Handler(BaseHTTPRequestHandler):
    registry: TargetRegistry

    def do_GET(self) -> None:
        if self.path.rstrip("/") != PATH:
            self.send_error(404, f"only {PATH} is served here")
            return
        self.registry.polled()
        body = json.dumps(self.registry.groups()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:  # one line per Prometheus refresh: not wanted
        return


class TargetRegistry:
    """The cluster's crucible scrape targets, served for Prometheus' HTTP service discovery.

    Args:
        host: address to serve on (the head node's Ray address).
        port: port to serve on.
        probe_s: how often every target is probed.
        misses: consecutive failed probes after which a target is dropped.
    """

    def __init__(self, host: str, port: int, probe_s: float = 5.0, misses: int = 3) -> None:
        self._targets: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._last_poll: float | None = None  # monotonic time of the last discovery read
        self._probe_s = probe_s
        self._misses = misses
        handler = type("Handler", (_Handler,), {"registry": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}{PATH}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        threading.Thread(target=self._probe_forever, daemon=True).start()

    def register(self, address: str, labels: dict[str, str]) -> str:
        """Add (or replace) target ``address`` with ``labels``; return the registry's URL.

        Args:
            address: ``host:port`` to scrape.
            labels: target labels (``run``, ``job``, ``rank``).
        """
        with self._lock:
            self._targets[address] = {"labels": dict(labels), "misses": 0}
        return self.url

    def deregister(self, address: str) -> None:
        """Remove target ``address`` (no-op if unknown).

        Args:
            address: ``host:port``.
        """
        with self._lock:
            self._targets.pop(address, None)

    def polled(self) -> None:
        """Note a read of the targets (by Prometheus' service discovery)."""
        self._last_poll = time.monotonic()

    def watched(self, within_s: float) -> bool:
        """Whether the targets were read in the last ``within_s`` seconds: a Prometheus is
        watching, and will scrape a target registered now once it refreshes.

        Args:
            within_s: how recent the last read must be.
        """
        return self._last_poll is not None and time.monotonic() - self._last_poll <= within_s

    def groups(self) -> list[dict[str, Any]]:
        """The targets as Prometheus' HTTP SD expects them: one group per target."""
        with self._lock:
            return [
                {"targets": [a], "labels": t["labels"]} for a, t in sorted(self._targets.items())
            ]

    def where(self) -> str:
        """The URL Prometheus reads the targets from."""
        return self.url

    def _probe_forever(self) -> None:
        while True:
            time.sleep(self._probe_s)
            with self._lock:
                addresses = list(self._targets)
            for address in addresses:
                # a connection, not a read: exporters count reads as scrapes
                ok = False
                host, _, port = address.rpartition(":")
                with (
                    contextlib.suppress(OSError, ValueError),
                    socket.create_connection((host, int(port)), timeout=2),
                ):
                    ok = True
                with self._lock:
                    t = self._targets.get(address)
                    if t is None:
                        continue
                    t["misses"] = 0 if ok else t["misses"] + 1
                    if t["misses"] >= self._misses:  # its process is gone
                        del self._targets[address]


def ensure_registry(port: int | None = None) -> Any:
    """The cluster's registry, created on this node if there is none (drivers call this; Ray
    Jobs runs them on the head node). Returns the actor handle.

    Args:
        port: the HTTP port (default :func:`sd_port`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0)(TargetRegistry).options(
        name=NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        ),
    )
    return actor.remote(node_address(), port if port is not None else sd_port())


def find_registry(timeout_s: float = 10.0) -> Any | None:
    """The cluster's registry, or None if none appears within ``timeout_s`` (or no Ray).

    Args:
        timeout_s: how long to wait for a driver to create it.
    """
    import ray

    if not ray.is_initialized():
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(NAME, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


# Where Ray's head writes the discovery file of its per-node metrics agents (Ray's default
# temp dir; see Ray's "Collecting and monitoring metrics").
RAY_SD_FILE = "/tmp/ray/session_latest/metrics/prometheus/prom_metrics_service_discovery.json"


def main(argv: list[str] | None = None) -> int:
    """``python -m crucible.monitoring.discovery --prometheus-config``: on a cluster's head,
    print the Prometheus config of :func:`scrape_config` for this head (launch configs run
    it before starting Prometheus there)."""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--prometheus-config", action="store_true", required=True)
    ap.add_argument("--scrape-interval", type=float, default=15.0)
    ap.add_argument("--ray-sd-file", default=RAY_SD_FILE)
    args = ap.parse_args(argv)
    import ray

    host = str(ray.util.get_node_ip_address())  # the address the registry binds on the head
    cfg = scrape_config(
        f"http://{host}:{sd_port()}{PATH}",
        ray_sd_file=args.ray_sd_file,
        scrape_interval_s=args.scrape_interval,
    )
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
