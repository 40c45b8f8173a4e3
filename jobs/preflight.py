"""Every check a run's driver would make that the submitting machine can make first, so that a
spec that cannot run fails before anything is written or submitted.

The driver repeats these checks on the cluster (the data may change in between); here they
only decide whether a run directory is claimed and a job submitted at all.
"""

from __future__ import annotations

from crucible.jobs.spec import (
    DataRunSpec,
    PPORunSpec,
    RejectionSamplingRunSpec,
    RunSpec,
    TrainRunSpec,
)


def preflight(spec: RunSpec) -> None:
    """Run ``spec``'s driver-side checks here; raise the first failure.

    Data runs: every input pattern matches a file. Train runs: the shards exist, pass their
    checks and fit the model (:func:`crucible.jobs.train.run.check_shards`).

    Args:
        spec: a resolved run spec.

    Raises:
        CrucibleError: what the driver would have failed on, in one line.
    """
    if isinstance(spec, DataRunSpec):
        from crucible.data_pipeline.readers.files import expand_inputs

        expand_inputs(spec.data.inputs)
    elif isinstance(spec, TrainRunSpec):
        from crucible.jobs.train.run import check_shards

        check_shards(spec)
    elif isinstance(spec, PPORunSpec):
        from crucible.jobs.rlhf.ppo import check_ppo

        check_ppo(spec)
    elif isinstance(spec, RejectionSamplingRunSpec):
        from crucible.jobs.rlhf.rejection import check_inputs

        check_inputs(spec)
