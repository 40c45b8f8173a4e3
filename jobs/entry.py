"""The entrypoint of every crucible Ray job: ``python -m crucible.jobs.entry RUN_URI
[--verbose]``.

It reads the resolved spec from the run directory and runs the job of its kind on the
cluster it was submitted to. ``--verbose`` keeps third-party logging (Ray Data's INFO logs
and progress bars), quiet by default.
"""

from __future__ import annotations

import base64
import sys

import yaml

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError
from crucible.jobs.runs import load_run_spec
from crucible.jobs.spec import TRAINING_KINDS


def run(run_dir: Location, executor: str = "ray", verbose: bool = False) -> int:
    """Run the job whose resolved spec is in ``run_dir``; return an exit code.

    Args:
        run_dir: the run directory.
        executor: the data executor.
        verbose: keep third-party logging.
    """
    spec = load_run_spec(run_dir)
    if spec.kind == "data":
        from crucible.data_pipeline.pipeline import run_pipeline
        from crucible.data_pipeline.stats_report import format_stats

        assert spec.data is not None
        run_pipeline(spec.data, run_dir, executor=executor, verbose=verbose)  # type: ignore[arg-type]
        print(format_stats(run_dir), flush=True)
        return 0
    if spec.kind in TRAINING_KINDS:
        from crucible.jobs.train.run import run_train

        return run_train(run_dir)
    if spec.kind == "rejection-sampling":
        from crucible.jobs.rlhf.rejection import run_rejection_sampling

        return run_rejection_sampling(run_dir)
    if spec.kind == "ppo":
        from crucible.jobs.rlhf.ppo import run_ppo

        return run_ppo(run_dir)
    raise CrucibleError(f"jobs of kind {spec.kind!r} are not runnable by this crucible version")


def run_shipped(blob: str, resume: bool = False, verbose: bool = False) -> int:
    """Run a spec that came with the job (base64 of its resolved YAML, as generated KubeRay
    RayJobs carry it): prepare its run directory here, on the cluster, then run it.

    Args:
        blob: base64 of the resolved spec YAML.
        resume: resume an existing run of this name (a changed spec is otherwise refused).
        verbose: keep third-party logging.
    """
    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec

    try:
        data = yaml.safe_load(base64.b64decode(blob, validate=True))
    except (ValueError, yaml.YAMLError) as e:
        raise CrucibleError(f"the job's --spec is not base64 of a YAML spec ({e})") from None
    return run(prepare_run(parse_spec(data, source="--spec"), resume=resume), verbose=verbose)


def main() -> None:
    args = sys.argv[1:]
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    try:
        if len(args) in (2, 3) and args[0] == "--spec" and args[2:] in ([], ["--resume"]):
            sys.exit(run_shipped(args[1], resume=args[2:] == ["--resume"], verbose=verbose))
        if len(args) != 1 or args[0].startswith("-"):
            print(
                "usage: python -m crucible.jobs.entry RUN_URI | --spec BASE64_YAML [--resume]"
                " [--verbose]",
                file=sys.stderr,
            )
            sys.exit(2)
        sys.exit(run(location(args[0]), verbose=verbose))
    except CrucibleError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
