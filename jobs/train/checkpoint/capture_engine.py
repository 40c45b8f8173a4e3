"""A DeepSpeed checkpoint engine that writes nothing: it takes deferred host copies of the
state dicts ``engine.save_checkpoint`` hands it (module states and this rank's ZeRO optimizer
shard), for :mod:`.async_save` to fill and write in the background.

DeepSpeed builds every state dict itself and passes each file's to its checkpoint engine's
``save(state_dict, path)``; swapping the engine for the length of one ``save_checkpoint`` call
is how crucible gets them without copying any of DeepSpeed's checkpoint code. Imports
DeepSpeed: import this module only after ``DS_ACCELERATOR`` is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

from crucible.jobs.train.checkpoint.host_copy import HostBuffers, HostCopy, host_copy

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


class CaptureEngine(CheckpointEngine):  # type: ignore[misc]
    """Records ``(path, deferred host copy)`` for each file DeepSpeed saves; loads as
    ``torch.load``.

    Args:
        buffers: host memory for the copies.
    """

    def __init__(self, buffers: HostBuffers) -> None:
        super().__init__()
        self.name = "CrucibleCaptureEngine"
        self.buffers = buffers
        self.captured: list[tuple[str, HostCopy]] = []

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        self.captured.append((path, host_copy(state_dict, self.buffers, defer=True)))

    def load(self, path: str, map_location: Any = None) -> Any:
        import torch

        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True


@contextmanager
def capturing(engine: DeepSpeedEngine, buffers: HostBuffers) -> Iterator[CaptureEngine]:
    """Within the block, ``engine.save_checkpoint`` captures instead of writing.

    Args:
        engine: the DeepSpeed engine.
        buffers: host memory for the copies.
    """
    capture = CaptureEngine(buffers)
    own = engine.checkpoint_engine
    engine.checkpoint_engine = capture
    try:
        yield capture
    finally:
        engine.checkpoint_engine = own
