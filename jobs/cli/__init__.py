"""The ``crucible`` command line.

A small, stable set of verbs; knobs live in the typed spec (``--set key.path=value``), not in
flags. Each verb group is one module here. User errors (:class:`CrucibleError`) print one
line and exit 2, without a traceback.
"""

from __future__ import annotations

import sys

import typer

from crucible.errors import CrucibleError
from crucible.jobs.cli import (
    cluster,
    data,
    demo,
    evaluate,
    generate,
    jobs,
    model,
    monitor,
    plan,
    spec,
    train,
)

app = typer.Typer(
    name="crucible",
    help="Raw web text to a trained GPT: data pipeline, ZeRO-3 training, GPU-hours monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cluster.app, name="cluster")
app.add_typer(data.app, name="data")
app.add_typer(jobs.app, name="jobs")
app.add_typer(model.app, name="model")
app.add_typer(spec.app, name="spec")
app.add_typer(train.app, name="train")
app.command("resume")(train.resume_cmd)
app.command("export")(train.export_cmd)
app.command("generate")(generate.generate_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("demo")(demo.demo)
app.command("plan")(plan.plan_cmd)
app.command("monitor")(monitor.monitor_cmd)
app.command("report")(monitor.report_cmd)
cluster.app.command("config")(plan.config_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``crucible`` script."""
    try:
        rc = app(args=argv, prog_name="crucible", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except CrucibleError as e:
        for line in str(e).splitlines() or ["error"]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
