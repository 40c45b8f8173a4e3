"""Resume on a different world size: a ZeRO-3 checkpoint converted to DeepSpeed's universal
format (one file per parameter and optimizer state, independent of the number of ranks).

``deepspeed.checkpoint.ds_to_universal`` does the conversion (ZeRO-3 is supported since
DeepSpeed 0.16); workers then load it with ``{"checkpoint": {"load_universal": true}}`` in
their DeepSpeed config, which repartitions fp32 weights and Adam moments over the new ranks.
The data order needs nothing: the reader's global batches do not depend on the world size.

The converted copy lives in ``checkpoints/universal/step-<N>/``, committed like a checkpoint
(its files, then a manifest with their sha256, last); it is derived data, rebuilt when absent.
The conversion reads the whole checkpoint, so it runs where that is cheap: in a Ray task, on
a local copy verified against the checkpoint's manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import uuid
from pathlib import Path

from crucible.cluster.storage import (
    Location,
    download_dir,
    read_manifest,
    scratch_dir,
    upload_dir,
)
from crucible.errors import CrucibleError
from crucible.jobs.train import checkpoint as ckpt


def ensure_universal(checkpoint: Location, tags: tuple[str, ...]) -> Location:
    """The universal copy of committed checkpoint ``checkpoint``, converted if it is absent.

    Args:
        checkpoint: a committed ``step-<N>`` directory.
        tags: the DeepSpeed tags (engines) in it to convert: a PPO checkpoint holds the actor
            (``ds``) and the critic.

    Raises:
        CrucibleError: a file of the checkpoint is missing or corrupt, or DeepSpeed could not
            convert it.
    """
    out = checkpoint.parent / ckpt.UNIVERSAL / checkpoint.name
    if read_manifest(out) is not None:
        return out
    work = scratch_dir("reshard", uuid.uuid4().hex[:12])
    try:
        source = work / "source"
        try:
            download_dir(checkpoint, source)  # every file checked against its sha256
        except CrucibleError as e:
            raise CrucibleError(f"cannot convert {checkpoint}: {e}") from None
        to_universal(source, work / "universal", tags=tags)
        upload_dir(work / "universal", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def say_converted(checkpoint: Location, saved: int, world: int, seconds: float) -> None:
    """The launcher's line about a conversion (the Ray driver's and torchrun's alike).

    Args:
        checkpoint: the converted ``step-<N>`` directory.
        saved: ranks that wrote it.
        world: ranks of the attempt that loads it.
        seconds: how long the conversion took.
    """
    print(
        f"converted {checkpoint.name} ({saved} ranks) to a universal checkpoint for {world} "
        f"ranks in {seconds:.1f} s",
        flush=True,
    )


def to_universal(
    checkpoint: Path, out: Path, workers: int = 1, tags: tuple[str, ...] = (ckpt.DS_TAG,)
) -> Path:
    """Convert a local copy of a checkpoint into the local directory ``out``.

    Args:
        checkpoint: a verified ``step-<N>`` directory.
        out: the universal checkpoint directory to create (one directory per tag inside).
        workers: processes for DeepSpeed's extraction (1: in this process).
        tags: the DeepSpeed tags to convert.

    Raises:
        CrucibleError: DeepSpeed could not convert the checkpoint.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for tag in tags:
        args = argparse.Namespace(
            input_folder=str(checkpoint / tag),
            output_folder=str(tmp / tag),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:  # DeepSpeed raises asserts and RuntimeErrors alike
            tail = log.getvalue().strip().splitlines()[-1:] or [""]
            raise CrucibleError(
                f"could not convert {checkpoint / tag} to a universal checkpoint: {e!r} {tail[0]}"
            ) from e
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
