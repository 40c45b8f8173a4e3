"""Packaging: one import package `crucible` mapped onto the top-level folders, nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import crucible

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["cluster", "model", "data_pipeline", "jobs", "monitoring"]


def test_every_source_folder_is_a_listed_package() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"crucible"}
    for top in SUBPACKAGES:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add(".".join(["crucible", *rel.parts]))
    assert found == listed


def test_tests_import_the_installed_package() -> None:
    # Not the source tree through sys.path: through the installed distribution's finder.
    assert "crucible" not in {Path(p).name for p in sys.path}
    assert Path(crucible.__file__).resolve() == ROOT / "__init__.py"
    from importlib.metadata import distribution

    assert distribution("crucible").read_text("entry_points.txt") is not None


@pytest.mark.slow
def test_wheel_holds_only_the_crucible_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("crucible-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {
        "crucible",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for sub in SUBPACKAGES:
        assert f"crucible/{sub}/__init__.py" in names
    for data in (
        "crucible/monitoring/rules/crucible.yml",
        "crucible/monitoring/dashboards/training.json",
        "crucible/monitoring/grafana/provisioning/datasources/crucible.yml",
    ):
        assert data in names
    assert not any(n.startswith("crucible/tests/") or n.startswith("crucible/.venv") for n in names)

    # `pip install .` (non-editable) gives a working package and CLI.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", "import crucible.jobs.cli, sys; print(crucible.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.strip() == str(target / "crucible" / "__init__.py")
