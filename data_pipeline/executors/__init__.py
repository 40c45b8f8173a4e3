"""Executors: run the same steps in-process (tests, debugging) or on Ray Data (at scale)."""
