"""Host copies of what a save writes, taken while the loop waits, so that training can go on
while they are written (see :mod:`.async_save`).

A copy is what ``torch.save`` would see: the object is pickled the way ``torch.save`` pickles
it, with every tensor storage copied once into host memory (pinned where there is a GPU, so
the copies from the device run at full speed) instead of being written. Unpickling the bytes
over those copies gives back an object equal to the original at the time of the copy: the
same containers, values, tensor views, shared storages, ``requires_grad`` and tensor
attributes, so ``torch.save`` of it writes the file it would have written then (with every
storage on the CPU). Nothing here knows what DeepSpeed puts in a state dict.

Taking a copy and filling it are separate: :func:`host_copy` with ``defer`` pickles the object
and sets its host memory aside while the loop waits, and a :class:`Stager` fills it on the
save's background thread (on a CUDA stream of its own), overlapping the next step's forward
and backward, which change none of it; the loop waits for the stager only before its next
optimizer step (torch DCP's asynchronous staging does the same).
"""

from __future__ import annotations

import io
import pickle
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

_PROTOCOL = 2  # torch.save's default pickle protocol


class HostBuffers:
    """Host memory for copies, reused from one save to the next.

    Saves of one run copy the same storages every time, so after the first save no memory is
    allocated (or pinned, which is slow) again. The caller gives a copy's buffers back once
    its files are written; at most one save is in flight, so one set is enough.

    Args:
        pinned: page-locked memory (device-to-host copies need it to be fast and
            asynchronous); only where CUDA is available.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._free: dict[int, list[torch.UntypedStorage]] = defaultdict(list)

    def take(self, nbytes: int) -> torch.UntypedStorage:
        """A host storage of ``nbytes`` (its contents are garbage)."""
        free = self._free[nbytes]
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned).untyped_storage()

    def give_back(self, storages: list[torch.UntypedStorage]) -> None:
        """Return storages taken for a copy that is no longer needed."""
        for s in storages:
            self._free[s.nbytes()].append(s)

    @property
    def nbytes(self) -> int:
        """Bytes held for reuse."""
        return sum(n * len(v) for n, v in self._free.items())


class HostCopy:
    """One object as :func:`host_copy` took it; :meth:`restore` gives it back once staged."""

    def __init__(
        self,
        data: bytes,
        storages: list[tuple[torch.UntypedStorage, torch.dtype]],
        pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]],
    ) -> None:
        self.data = data
        self.storages = storages
        self._pending = pending  # (source, its host copy) not copied yet

    @property
    def staged(self) -> bool:
        """Every storage has been copied (or its copy queued, on a GPU)."""
        return not self._pending

    def stage(self, non_blocking: bool = False) -> None:
        """Copy the storages not copied yet and release them (the object may change then).

        Args:
            non_blocking: queue the copies from a device on the current stream without
                waiting for them (the caller synchronizes the stream).
        """
        for src, dst in self._pending:
            # As tensors: a tensor copy releases the GIL (a storage's copy_ holds it, which
            # would stall the loop's thread while the save's thread copies)
            _bytes_of(dst).copy_(_bytes_of(src), non_blocking=non_blocking)
        self._pending = []

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held."""
        return sum(s.nbytes() for s, _ in self.storages)

    def restore(self) -> Any:
        """The object, its tensors on the host copies (every call gives a new object)."""
        if not self.staged:
            raise RuntimeError("restore() of a host copy that was not staged")
        storages = self.storages
        typed: dict[int, torch.storage.TypedStorage] = {}

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                _, index = pid
                if index not in typed:
                    storage, dtype = storages[index]
                    typed[index] = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
                        wrap_storage=storage, dtype=dtype, _internal=True
                    )
                return typed[index]

        return _Unpickler(io.BytesIO(self.data)).load()


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A storage's bytes as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def host_copy(obj: Any, buffers: HostBuffers, defer: bool = False) -> HostCopy:
    """Copy ``obj`` (anything ``torch.save`` can save) into host memory.

    Args:
        obj: what would be saved.
        buffers: where the storages' copies go.
        defer: only pickle ``obj`` and set the memory aside; :meth:`HostCopy.stage` (or a
            :class:`Stager`) copies the storages, which must not change until then. The
            copy holds them, so a temporary one stays alive until it is copied.
    """
    storages: list[tuple[torch.UntypedStorage, torch.dtype]] = []
    pending: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []
    index: dict[int, int] = {}  # a storage's identity (as torch.save keys it) -> its copy

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, torch.storage.TypedStorage):
                src, dtype = o._untyped_storage, o.dtype
            elif isinstance(o, torch.UntypedStorage):
                src, dtype = o, torch.uint8
            else:
                return None
            key = src._cdata
            if key not in index:
                dst = buffers.take(src.nbytes())
                pending.append((src, dst))
                index[key] = len(storages)
                storages.append((dst, dtype))
            return ("storage", index[key])

    buf = io.BytesIO()
    _Pickler(buf, protocol=_PROTOCOL).dump(obj)
    copy = HostCopy(buf.getvalue(), storages, pending)
    if not defer:
        copy.stage()
    return copy


class Stager:
    """Stages deferred host copies on another thread, after the work queued so far.

    Made on the loop's thread when the copies are taken: on a GPU it marks the point of the
    current stream's queue that they must follow. :meth:`run` (on the save's thread) copies
    them on a stream of its own and waits for the copies; :meth:`wait` (on the loop's
    thread, before the state changes) waits for :meth:`run`.

    Args:
        copies: the deferred copies.
    """

    def __init__(self, copies: Sequence[HostCopy]) -> None:
        self.copies = copies
        self._done = threading.Event()
        self._stream: Any = None
        self._after: Any = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._after = torch.cuda.current_stream().record_event()

    @property
    def done(self) -> bool:
        """:meth:`run` is over (the copies are in host memory, or it failed)."""
        return self._done.is_set()

    def run(self) -> None:
        """Copy every storage and wait until the copies are in host memory."""
        try:
            if self._stream is None:
                for c in self.copies:
                    c.stage()
                return
            self._stream.wait_event(self._after)
            with torch.cuda.stream(self._stream):
                for c in self.copies:
                    c.stage(non_blocking=True)
            self._stream.synchronize()
        finally:
            self._done.set()

    def wait(self) -> float:
        """Wait until :meth:`run` is over; return the seconds waited."""
        if self._done.is_set():
            return 0.0
        t0 = time.perf_counter()
        self._done.wait()
        return time.perf_counter() - t0
