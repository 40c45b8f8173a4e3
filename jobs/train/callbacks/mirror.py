"""A local directory for a logger that writes files, mirrored into the run directory when the
run lives on an object store (loggers write with plain file I/O)."""

from __future__ import annotations

from pathlib import Path

from crucible.cluster.storage import Location, cache_key, scratch_dir


class MirroredDir:
    """``<run>/<name>`` itself where the run is on a local filesystem; else a node-local
    directory whose files :meth:`sync` uploads to ``<run>/<name>``.

    Args:
        run_dir: the run directory.
        name: the subdirectory.
    """

    def __init__(self, run_dir: Location, name: str) -> None:
        self.remote = run_dir / name
        if run_dir.is_local:
            self.local = self.remote.local_path
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.local = scratch_dir("loggers", cache_key(run_dir.uri), name)
        self._sent: dict[Path, tuple[int, int]] = {}

    def sync(self) -> None:
        """Upload the files that changed since the last call (object stores only)."""
        if self.remote.is_local:
            return
        for p in sorted(self.local.rglob("*")):
            if not p.is_file():
                continue
            st = p.stat()
            if self._sent.get(p) != (st.st_size, st.st_mtime_ns):
                (self.remote / p.relative_to(self.local).as_posix()).upload(p)
                self._sent[p] = (st.st_size, st.st_mtime_ns)
