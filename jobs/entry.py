"""The entrypoint of every crucible Ray job: ``python -m crucible.jobs.entry RUN_URI``.

It reads the resolved spec from the run directory and runs the job of its kind on the
cluster it was submitted to.
"""

from __future__ import annotations

import sys

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError
from crucible.jobs.runs import load_run_spec


def run(run_dir: Location, executor: str = "ray") -> int:
    """Run the job whose resolved spec is in ``run_dir``; return an exit code."""
    spec = load_run_spec(run_dir)
    if spec.kind == "data":
        from crucible.data_pipeline.report import format_stats
        from crucible.data_pipeline.run import run_pipeline

        assert spec.data is not None
        run_pipeline(spec.data, run_dir, executor=executor)  # type: ignore[arg-type]
        print(format_stats(run_dir), flush=True)
        return 0
    if spec.kind == "train":
        from crucible.jobs.train.run import run_train

        return run_train(run_dir)
    raise CrucibleError(f"jobs of kind {spec.kind!r} are not runnable by this crucible version")


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m crucible.jobs.entry RUN_URI", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(run(location(sys.argv[1])))
    except CrucibleError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
