"""Where crucible runs: the cluster spec, the local embedded cluster (a token-authenticated
Ray head and a Prometheus beside it), and the state they keep."""
