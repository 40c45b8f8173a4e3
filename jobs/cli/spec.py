"""``crucible spec check``: validate a spec and print it resolved."""

from __future__ import annotations

from pathlib import Path

import typer

from crucible.jobs.spec import dump_spec, load_spec

app = typer.Typer(help="Validate job specs.", no_args_is_help=True)


@app.command("check")
def check(
    spec: Path = typer.Argument(..., help="The YAML spec to validate."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a value: key.path=value (repeatable)."
    ),
) -> None:
    """Validate SPEC strictly and print it with every default filled in."""
    resolved = load_spec(spec, set_)
    typer.echo(dump_spec(resolved), nl=False)
