"""What users run: typed job specs, the ``crucible`` CLI and submission through the Ray Jobs
API."""
