"""Checkpoints: every rank's ZeRO-3 shards plus crucible's state, committed atomically, on any
storage the run's URI names.

Layout of ``<run>/checkpoints/``::

    step-<N>/
        ds/                      DeepSpeed's files: zero_pp_rank_<r>_mp_rank_00_*_states.pt
        zero_to_fp32.py          DeepSpeed's consolidation script (self-contained checkpoint)
        crucible_state/
            state.json           step, samples consumed, reader state, world size, ledger, spec
            rank-<r>.pt          RNG states of rank r
        manifest.json            sha256 + size of every file above; written last
    universal/step-<N>/          a copy converted for another world size (see .reshard)
    latest                       "step-<N>", replaced after the commit (a hint; manifests rule)

Save: DeepSpeed only ever sees a local directory, the *stage*. On a filesystem that renames
(local disk, NFS) the stage is ``step-<N>.tmp`` in place: every rank writes and fsyncs its
files there (hashing them as they are written, see :mod:`.hashing_engine`), rank 0 checks
every rank's shards are present, writes ``manifest.json``, renames the directory to
``step-<N>`` and only then replaces ``latest``. On an object store the stage is in node-local
scratch; each rank uploads the files it owns straight to ``step-<N>/`` and rank 0 writes the
manifest, then ``latest``, after all of them. Either way a crash at any point leaves the
previous checkpoint as the newest committed one, or the new one complete: a ``step-<N>``
without a manifest is never a candidate.

Asynchronous save (``checkpoint.async_save``, the default; see :mod:`.async_save`): the loop
waits only while every file's state is copied to host memory; a background thread on each
rank writes those copies into the stage and runs the same commit, over a process group of
its own. One save is in flight at most (:data:`IN_FLIGHT`); the next save, the end of the
run and a rollback's reload wait for it.

Load: the driver reads manifests only. Each rank verifies the files it owns (sizes, or sizes
and sha256), in parallel with the others; from an object store verifying is fetching them
into node-local scratch, checked on the way. One bad file makes the whole group fall back to
the previous checkpoint (see :func:`.load.choose_checkpoint`).
"""

from crucible.cluster.storage import sha256_file
from crucible.jobs.train.checkpoint.in_flight import IN_FLIGHT, SaveSlot
from crucible.jobs.train.checkpoint.layout import (
    DS_TAG,
    MANIFEST,
    STATE,
    UNIVERSAL,
    committed_steps,
    list_files,
    missing_rank_files,
    owned_by,
    owner_rank,
    shared_files,
    step_path,
)
from crucible.jobs.train.checkpoint.load import (
    check_manifest,
    check_universal,
    choose_checkpoint,
    fetch,
    latest_committed,
    latest_valid,
    read_manifest,
    read_state,
    verify,
)
from crucible.jobs.train.checkpoint.retention import retain
from crucible.jobs.train.checkpoint.save import (
    SaveStats,
    base_frozen,
    clear_for_save,
    commit,
    finish_save,
    hash_own_files,
    open_stage,
    publish_own,
    save,
    stage_dir,
)

__all__ = [
    "DS_TAG",
    "IN_FLIGHT",
    "MANIFEST",
    "STATE",
    "UNIVERSAL",
    "SaveSlot",
    "SaveStats",
    "base_frozen",
    "check_manifest",
    "check_universal",
    "choose_checkpoint",
    "clear_for_save",
    "commit",
    "committed_steps",
    "fetch",
    "finish_save",
    "hash_own_files",
    "latest_committed",
    "latest_valid",
    "list_files",
    "missing_rank_files",
    "open_stage",
    "owned_by",
    "owner_rank",
    "publish_own",
    "read_manifest",
    "read_state",
    "retain",
    "save",
    "sha256_file",
    "shared_files",
    "stage_dir",
    "step_path",
    "verify",
]
