"""SIGTERM as a preemption notice: spot and preemptible VMs, Kubernetes evictions and Slurm
send it to the training processes some seconds before they are killed (30 s on GCE spot, 2
minutes after an AWS spot notice, ``terminationGracePeriodSeconds`` on Kubernetes, 30 s
from torchrun's agent when it is itself terminated). The handler only notes the time; the
stop callback (:mod:`.stopper`) reads the note after each step and every rank agrees to stop
with a checkpoint of that step.

Python runs signal handlers on the main thread and lets only the main thread install them.
Under torchrun the loop is the main thread. Under Ray Train the loop runs on a thread of the
worker actor, whose main thread serves the actor's tasks and has Ray's own SIGTERM handler
(end the process at once); the handler is installed there through the actor's
``__ray_call__`` (a Ray DeveloperAPI that runs a function on the actor's main thread).
While the attempt runs, the previous handler is set aside rather than chained: what it
stands for, ending the process, is done by the loop itself once the checkpoint is committed
(it raises :class:`Preempted`). It is put back when the attempt ends, so a later SIGTERM
ends the process as before.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_Handler = Any  # what signal.signal returns: a callable, SIG_DFL, SIG_IGN or None


class Preempted(RuntimeError):
    """The attempt stopped after a SIGTERM with a checkpoint of its last step; raised by
    every rank once it is committed, so that Ray Train counts a failure and restarts the
    group from that checkpoint (a train function that returns would end the run as done)."""


class _Note:
    """What the handler leaves behind for the loop (one per process)."""

    at: float | None = None
    """Unix time the first SIGTERM arrived (None: none yet)."""
    previous: _Handler = None
    installed: bool = False


_NOTE = _Note()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if _NOTE.at is None:  # only a note: the loop does the work between steps
        _NOTE.at = time.time()


def signalled_at() -> float | None:
    """Unix time this process got SIGTERM while the handler was installed (None: not)."""
    return _NOTE.at


def _install_here(_actor: object = None) -> str | None:
    if threading.current_thread() is not threading.main_thread():
        return "not on the process's main thread"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Restart system calls the signal interrupts (Python's default makes them fail with
    # EINTR): file writes and the collective libraries' sockets carry on through it.
    signal.siginterrupt(signal.SIGTERM, False)
    if not _NOTE.installed:
        _NOTE.previous = previous
    _NOTE.installed, _NOTE.at = True, None
    return None


def _restore_here(_actor: object = None) -> None:
    if _NOTE.installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _NOTE.previous)
        _NOTE.installed = False


def _on_main_thread(fn: Any, on_ray: bool) -> Any:
    if threading.current_thread() is threading.main_thread():
        return fn()
    if not on_ray:
        return "the loop runs outside the main thread, and not in a Ray actor"
    import ray

    actor = ray.get_runtime_context().current_actor
    return ray.get(actor.__ray_call__.remote(fn))


def install(on_ray: bool) -> bool:
    """Install the SIGTERM note on this process's main thread; return whether it is in.

    A failure is logged, never raised: without it SIGTERM ends the rank as it always did.

    Args:
        on_ray: the rank is a Ray Train worker (the loop runs on one of its threads).
    """
    try:
        why = _on_main_thread(_install_here, on_ray)
    except Exception as e:  # a rank trains on without it
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        log.warning("no checkpoint on preemption: SIGTERM handler not installed (%s)", why)
    return why is None


def restore(on_ray: bool) -> None:
    """Put back the SIGTERM handler that :func:`install` set aside.

    Args:
        on_ray: as for :func:`install`.
    """
    try:
        _on_main_thread(_restore_here, on_ray)
    except Exception as e:
        log.warning("SIGTERM handler not restored (%s: %s)", type(e).__name__, e)
