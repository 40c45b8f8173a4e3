"""The one checkpoint save of a process that may be in flight in the background.

A save's host copy is written by a background thread while training goes on. Two in flight
would hold two copies of the state and could commit out of order, so there is one slot per
process: a save starts only once the previous one has been taken (see :meth:`SaveSlot.take`),
and loading a checkpoint first waits for the save in flight (see
:func:`~crucible.jobs.train.checkpoint.choose_checkpoint`), so that a rollback sees it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any


class SaveSlot:
    """Room for one background save; its result (or error) waits in the slot until taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: futures.Future[Any] | None = None

    @property
    def busy(self) -> bool:
        """A save was started and not yet taken (it may have finished)."""
        return self._future is not None

    def start(self, work: Callable[[], Any], name: str) -> futures.Future[Any]:
        """Run ``work`` on a background thread as the save in flight.

        The thread is a daemon: a process that exits without waiting for it leaves the save
        uncommitted, never half-committed (the commit protocol writes the manifest last).

        Args:
            work: writes and commits the save; returns what :meth:`take` hands back.
            name: the thread's name (it shows in stack dumps).

        Raises:
            RuntimeError: a save is already in the slot (take it first).
        """
        with self._lock:
            if self._future is not None:
                raise RuntimeError("a checkpoint save is already in flight: take it first")
            fut: futures.Future[Any] = futures.Future()
            self._future = fut
        threading.Thread(target=_run, args=(fut, work), name=name, daemon=True).start()
        return fut

    def join(self) -> None:
        """Wait until the save in flight (if any) has finished; it stays in the slot."""
        fut = self._future
        if fut is not None:
            futures.wait([fut])

    def take(self, block: bool) -> futures.Future[Any] | None:
        """The save in the slot, finished, which frees the slot; None if there is none (or,
        without ``block``, while it is still running).

        Args:
            block: wait for a save still running.
        """
        fut = self._future
        if fut is None or not (block or fut.done()):
            return None
        futures.wait([fut])
        with self._lock:
            self._future = None
        return fut


def _run(fut: futures.Future[Any], work: Callable[[], Any]) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(work())
    except BaseException as e:  # handed to whoever takes the save
        fut.set_exception(e)


IN_FLIGHT = SaveSlot()
"""This process's slot: every rank has one save in flight at most."""
