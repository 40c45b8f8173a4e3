"""Resume on a different world size: a ZeRO-3 checkpoint converted to DeepSpeed's universal
format (one file per parameter and optimizer state, independent of the number of ranks).

``deepspeed.checkpoint.ds_to_universal`` does the conversion (ZeRO-3 is supported since
DeepSpeed 0.16); workers then load it with ``{"checkpoint": {"load_universal": true}}`` in
their DeepSpeed config, which repartitions fp32 weights and Adam moments over the new ranks.
The data order needs nothing: the reader's global batches do not depend on the world size.

The converted copy lives in ``checkpoints/universal/step-<N>/`` and is written under a
temporary name and renamed, like a checkpoint; it is derived data, rebuilt when absent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path

from crucible.errors import CrucibleError
from crucible.jobs.train import checkpoint as ckpt

DONE = "_CONVERTED"


def to_universal(checkpoint: Path, out: Path, workers: int = 1) -> Path:
    """Convert committed checkpoint ``checkpoint`` into ``out`` (skipped if already done).

    Args:
        checkpoint: a verified ``step-<N>`` directory.
        out: the universal checkpoint directory to create (DeepSpeed tag ``ds`` inside).
        workers: processes for DeepSpeed's extraction (1: in this process).

    Raises:
        CrucibleError: DeepSpeed could not convert the checkpoint.
    """
    if (out / DONE).exists():
        return out
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint / ckpt.DS_TAG),
        output_folder=str(tmp / ckpt.DS_TAG),
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
            f"could not convert {checkpoint} to a universal checkpoint: {e!r} {tail[0]}"
        ) from e
    (tmp / DONE).touch()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
