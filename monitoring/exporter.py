"""Serve a process's metrics over HTTP and register it for the cluster's Prometheus.

Each exporting process (a training rank, a data job's driver) runs a prometheus-client HTTP
server on its node's Ray address and registers ``host:port`` with labels ``run``, ``job`` and
``rank`` in the cluster's target registry (:mod:`.discovery`), which Prometheus reads through
HTTP service discovery, on the local cluster and on any multi-node one alike.

Metrics never stop a job: a port that cannot be bound or a registry that cannot be reached is
logged once and the caller gets ``None`` (or an unannounced exporter).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from crucible.monitoring import discovery

log = logging.getLogger(__name__)

# port -> (server, registry actor, address, scrape counter)
_servers: dict[int, tuple[Any, Any, str, _Scrapes]] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


class _Scrapes:
    """The registry as the HTTP server sees it, counting the scrapes that read it (the target
    registry's liveness probe only connects, so every read is a scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.count = 0
        self.cond = threading.Condition()

    def _seen(self) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def collect(self) -> Any:
        self._seen()
        return self.registry.collect()

    def restricted_registry(self, names: Any) -> Any:
        self._seen()
        return self.registry.restricted_registry(names)

    def wait_next(self, timeout_s: float) -> bool:
        """Whether a scrape began after this call, within ``timeout_s``."""
        with self.cond:
            start = self.count
            return self.cond.wait_for(lambda: self.count > start, timeout=timeout_s)


def start_exporter(
    run: str,
    role: str,
    rank: int,
    registry: CollectorRegistry,
    *,
    port: int = 0,
    host: str | None = None,
    announce: bool = True,
) -> int | None:
    """Serve ``registry`` on ``host:port`` and register it for the cluster's Prometheus.

    Never raises for operational failures: a port that cannot be bound returns None (logged
    once); a registry that cannot be reached leaves the exporter up but unannounced (logged
    once). The target is removed again by :func:`stop_exporter` or at interpreter exit.

    Args:
        run: run name (label ``run``).
        role: job kind, e.g. ``train`` or ``data`` (label ``job``).
        rank: worker rank (label ``rank``).
        registry: the metrics to serve (e.g. ``TrainMetrics.registry``).
        port: port to bind; 0 picks a free one.
        host: address to bind and announce (default: the node's Ray address).
        announce: register with the cluster's target registry.

    Returns:
        The bound port, or None if nothing is served.
    """
    host = host or discovery.node_address()
    scrapes = _Scrapes(registry)
    try:
        server, _thread = start_http_server(port, addr=host, registry=scrapes)  # type: ignore[arg-type]
    except OSError as e:
        _warn_once(f"bind:{port}", "metrics exporter cannot bind %s:%s (%s); the job continues "
                   "without it", host, port, e.strerror or e)  # fmt: skip
        return None
    bound = int(server.server_address[1])
    address = f"{host}:{bound}"
    actor = None
    if announce:
        try:
            import ray
        except ImportError:  # a rank under torchrun on a host without Ray
            ray = None  # type: ignore[assignment]
        if ray is None or not ray.is_initialized():  # not a Ray worker (torchrun, a script)
            _warn_once("sd", "not in a Ray job: metrics are served at %s for a scrape "
                       "configured by hand; no Prometheus discovers them", address)  # fmt: skip
            announce = False
    if announce:
        try:
            actor = discovery.find_registry()
            if actor is None:
                _warn_once("sd", "no crucible metrics registry on this Ray cluster: %s is "
                           "served but Prometheus will not find it", address)  # fmt: skip
            else:
                labels = {"run": run, "job": role, "rank": str(rank)}
                ray.get(actor.register.remote(address, labels), timeout=30)
        except Exception as e:  # metrics must never stop the job
            _warn_once("sd", "cannot register metrics target %s (%s)", address, e)
            actor = None
    with _lock:
        _servers[bound] = (server, actor, address, scrapes)
    return bound


def stop_exporter(port: int, final_scrape_s: float = 0.0, until_samples: int | None = None) -> None:
    """Stop the exporter on ``port`` and deregister it (no-op if unknown).

    Args:
        port: as returned by :func:`start_exporter`.
        final_scrape_s: if the exporter is announced and something has scraped it, first
            wait (up to this long) for a scrape that begins now, so the final values reach
            Prometheus; it returns as soon as one did, whatever the scrape interval. (Never
            scraped: no Prometheus is watching, or the job was shorter than its discovery.)
        until_samples: also wait for an exporter never scraped when a Prometheus has read
            the cluster's targets within ``final_scrape_s`` (it will discover this one), until
            Prometheus holds this many samples of it (2: rates of a short job exist). A
            job's last step takes up to a discovery refresh and this many scrape intervals.
    """
    with _lock:
        server, actor, address, scrapes = _servers.pop(port, (None, None, "", None))
    if server is None:
        return
    watched = (
        final_scrape_s > 0
        and actor is not None
        and scrapes is not None
        and (
            scrapes.count > 0
            or (until_samples is not None and _prometheus_reads(actor, final_scrape_s))
        )
    )
    waits = max((until_samples or 1) - scrapes.count, 1) if watched else 0  # type: ignore[union-attr]
    for _ in range(waits):
        if not scrapes.wait_next(final_scrape_s):  # type: ignore[union-attr]
            log.info(
                "metrics target %s was not scraped within %.0f s of the end; its final "
                "values may be missing from Prometheus", address, final_scrape_s,
            )  # fmt: skip
            break
    if actor is not None:
        with contextlib.suppress(Exception):
            import ray

            ray.get(actor.deregister.remote(address), timeout=10)
    server.shutdown()
    server.server_close()


def _prometheus_reads(actor: Any, within_s: float) -> bool:
    """Whether a Prometheus read the registry's targets in the last ``within_s`` seconds."""
    try:
        import ray

        return bool(ray.get(actor.watched.remote(within_s), timeout=10))
    except Exception:  # metrics never stop a job
        return False


@atexit.register
def _stop_all() -> None:
    for port in list(_servers):
        with contextlib.suppress(Exception):
            stop_exporter(port)
