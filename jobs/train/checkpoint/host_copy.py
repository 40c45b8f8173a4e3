"""Host copies of what a save writes, taken while the loop waits, so that training can go on
while they are written (see :mod:`.async_save`).

A copy is what ``torch.save`` would see: the object is pickled the way ``torch.save`` pickles
it, with every tensor storage copied once into host memory (pinned where there is a GPU, so
the copies from the device run at full speed) instead of being written. Unpickling the bytes
over those copies gives back an object equal to the original at the time of the copy: the
same containers, values, tensor views, shared storages, ``requires_grad`` and tensor
attributes, so ``torch.save`` of it writes the file it would have written then (with every
storage on the CPU). Nothing here knows what DeepSpeed puts in a state dict.
"""

from __future__ import annotations

import io
import pickle
from collections import defaultdict
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
    """One object as :func:`host_copy` took it; :meth:`restore` gives it back."""

    def __init__(self, data: bytes, storages: list[tuple[torch.UntypedStorage, torch.dtype]]):
        self.data = data
        self.storages = storages

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held."""
        return sum(s.nbytes() for s, _ in self.storages)

    def restore(self) -> Any:
        """The object, its tensors on the host copies (every call gives a new object)."""
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


def host_copy(obj: Any, buffers: HostBuffers) -> HostCopy:
    """Copy ``obj`` (anything ``torch.save`` can save) into host memory.

    Device-to-host copies are queued without waiting; call :func:`wait_for_copies` before
    the originals change or the copies are read.

    Args:
        obj: what would be saved.
        buffers: where the storages' copies go.
    """
    storages: list[tuple[torch.UntypedStorage, torch.dtype]] = []
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
                dst.copy_(src, non_blocking=src.device.type == "cuda")
                index[key] = len(storages)
                storages.append((dst, dtype))
            return ("storage", index[key])

    buf = io.BytesIO()
    _Pickler(buf, protocol=_PROTOCOL).dump(obj)
    return HostCopy(buf.getvalue(), storages)


def wait_for_copies() -> None:
    """Wait until queued device-to-host copies are done (nothing to wait for on CPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
