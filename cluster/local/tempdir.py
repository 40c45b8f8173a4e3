"""The private directory that holds Ray's temp dir (its unix sockets and session logs) for
one local cluster: short enough for Ray's socket paths whatever the home directory, and
refused when it is not a directory of ours."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from crucible.cluster.local.state import ClusterState
from crucible.errors import CrucibleError

# Ray puts unix sockets under its temp dir, at
# <temp>/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid, up to 7 digits>/sockets/plasma_store,
# and a socket path holds at most 107 bytes.
MAX_RAY_TEMP_DIR = 107 - len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def _temp_dir_name(state_dir: Path) -> str:
    digest = hashlib.sha256(str(state_dir.expanduser().resolve()).encode()).hexdigest()
    return f"crucible-{os.getuid()}-{digest[:10]}"


def cluster_temp_dir(state_dir: Path) -> Path:
    """The private directory that holds Ray's temp dir (its ``ray`` subdirectory) for the
    cluster in ``state_dir``: ``crucible-<uid>-<sha256 of the state dir, 10 hex>`` in the
    system temp dir (``$TMPDIR``) if Ray's socket paths fit there, else in /tmp, where Ray's
    own default ``/tmp/ray`` lives. A function of the state dir, so ``up`` and ``down`` agree
    and two clusters never share one.

    Args:
        state_dir: the cluster's state directory (resolved here).
    """
    name = _temp_dir_name(state_dir)
    candidates = [Path(tempfile.gettempdir()) / name, Path("/tmp") / name]
    for path in candidates:
        if len(str(path / "ray")) <= MAX_RAY_TEMP_DIR:
            return path
    raise CrucibleError(
        f"Ray's temp dir {candidates[-1] / 'ray'} would be longer than {MAX_RAY_TEMP_DIR} "
        "characters, too long for Ray's socket paths; set $TMPDIR to a shorter directory"
    )


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or take it if it is already a directory of ours.

    It lies where every user may write: a symlink, a file or a directory of someone else's
    found there is refused, never followed. Ray makes its own temp dir world-writable, which
    is why that is a subdirectory of this one.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CrucibleError(f"cannot create {path} for Ray's temp dir: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        _refuse_temp_dir(path, path.lstat())
        raise CrucibleError(f"cannot open {path} for Ray's temp dir: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        _refuse_temp_dir(path, st)
        if stat.S_IMODE(st.st_mode) != 0o700:  # mkdir's mode went through the umask
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _refuse_temp_dir(path: Path, st: os.stat_result) -> None:
    """Raise the clear error for ``path`` (whose status is ``st``) unless it is our directory."""
    if stat.S_ISLNK(st.st_mode):
        what = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        what = "is not a directory"
    elif st.st_uid != os.getuid():
        what = f"belongs to uid {st.st_uid}, not to you"
    else:
        return
    raise CrucibleError(
        f"{path} {what}; crucible keeps Ray's temp dir there: have it removed, or set $TMPDIR "
        "to a directory of your own"
    )


def remove_temp_dir(state: ClusterState) -> None:
    """Remove the private temp dir ``up`` made for this cluster, and nothing else: a recorded
    path that is not this state dir's, or no longer a directory of ours, is left alone."""
    if not state.temp_dir:
        return
    path = Path(state.temp_dir)
    if path.name != _temp_dir_name(Path(state.state_dir)):
        return
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise CrucibleError(
            f"the cluster is stopped, but its Ray temp dir {path} could not be removed "
            f"({e.strerror}); remove it by hand"
        ) from None
