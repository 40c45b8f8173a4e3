"""What runs cost and how fast they go: metrics, the GPU-hours ledger, Prometheus rules,
Grafana dashboards, ``monitor`` and ``report``."""
