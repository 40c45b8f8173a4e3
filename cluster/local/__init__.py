"""The local embedded cluster: a token-authenticated Ray head and a Prometheus beside it.

``up`` starts ``ray start --head --block`` and ``prometheus`` as children in their own
sessions, waits until both answer, and records their pids (with process start times, so a
recycled pid is never mistaken for ours) in ``<state>/cluster.json``. ``down`` stops exactly
those processes and their descendants, never anything found by name. The Ray auth token is
generated into ``<state>/auth_token`` with mode 0600; it is passed to Ray as a path
(``RAY_AUTH_TOKEN_PATH``), so it never appears in a command line, an environment listing or
a log.

Ray's user-facing HTTP services (dashboard and Jobs API, client server) and Prometheus bind to
127.0.0.1. Ray's internal gRPC services (GCS, raylet, object manager) bind to the node address
Ray picks itself (Ray maps a loopback ``--node-ip-address`` to the routable one) and are
protected by the same token.

Ray's temp dir (its unix sockets and session logs) is not in the state directory but in a
private directory under /tmp named after it (:func:`cluster_temp_dir`), so that Ray's socket
paths stay short whatever the home directory; ``down`` removes it.

Modules: :mod:`.lifecycle` (``up``, ``down``, the Prometheus config), :mod:`.state` (what
``cluster.json`` records), :mod:`.token`, :mod:`.ports`, :mod:`.tempdir`, :mod:`.processes`
(finding, waiting for and stopping our processes), :mod:`.health` (``status``).
"""

from crucible.cluster.local.health import prometheus_targets, status
from crucible.cluster.local.lifecycle import down, prometheus_config, up
from crucible.cluster.local.ports import WORKER_PORTS, free_port, free_ports
from crucible.cluster.local.processes import find_prometheus
from crucible.cluster.local.state import (
    HOST,
    STATE_FILE,
    ClusterState,
    Ports,
    Proc,
    default_state_dir,
    load_state,
    save_state,
)
from crucible.cluster.local.tempdir import cluster_temp_dir
from crucible.cluster.local.token import TOKEN_FILE, auth_headers, ensure_token, read_token

__all__ = [
    "HOST",
    "STATE_FILE",
    "TOKEN_FILE",
    "WORKER_PORTS",
    "ClusterState",
    "Ports",
    "Proc",
    "auth_headers",
    "cluster_temp_dir",
    "default_state_dir",
    "down",
    "ensure_token",
    "find_prometheus",
    "free_port",
    "free_ports",
    "load_state",
    "prometheus_config",
    "prometheus_targets",
    "read_token",
    "save_state",
    "status",
    "up",
]
