"""The job spec: one YAML file per run, parsed into typed, strict sections.

Sections belong to the folders that use them (``cluster`` to ``crucible.cluster``, ...);
this module only composes them and handles loading, overrides and the resolved copy that is
saved with each run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from crucible.cluster.spec import ClusterSpec
from crucible.config import StrictModel, apply_overrides, load_yaml, spec_hash, validate
from crucible.data_pipeline.spec import DataSpec
from crucible.model.config import ModelSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunSpec(StrictModel):
    """A whole run: what kind of job, its name, and its sections."""

    kind: Literal["data", "train"] = Field(description="The job to run.")
    name: str = Field(description="Stable run name; the run directory is <storage>/<name>.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where it runs.")
    data: DataSpec | None = Field(None, description="Raw text to documents and shards.")
    model: ModelSpec | None = Field(None, description="The GPT to train and how it is sharded.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "use letters, digits, '.', '_' or '-' (at most 100, not starting with a dot)"
            )
        return v

    @model_validator(mode="after")
    def _sections_for_kind(self) -> RunSpec:
        if self.kind == "data" and self.data is None:
            raise ValueError("a data job needs a `data:` section (at least data.inputs)")
        if self.kind == "train" and self.model is None:
            raise ValueError("a train job needs a `model:` section (e.g. model.preset: tiny)")
        return self


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Load a spec file, apply ``--set`` overrides and validate it strictly."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate(RunSpec, data, source=str(path))


def parse_spec(data: dict[str, Any], source: str = "spec") -> RunSpec:
    """Validate an in-memory spec mapping."""
    return validate(RunSpec, data, source=source)


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (every default filled in), as saved in the run directory."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def write_resolved(spec: RunSpec, run_dir: Path) -> Path:
    """Write ``spec.resolved.yaml`` (and its hash) into ``run_dir``; return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "spec.resolved.yaml"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(f"# spec sha256: {spec_hash(spec)}\n" + dump_spec(spec))
    tmp.replace(out)
    return out
