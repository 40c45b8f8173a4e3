"""Typed, strict job specs: the base model, YAML loading, dotted overrides, readable errors.

Every section of a spec is a :class:`StrictModel` owned by its folder (``model`` by
``crucible.model``, ``data`` by ``crucible.data_pipeline`` ...). Unknown keys are errors that
name their full path and the closest valid key; wrong types and out-of-range values name the
path, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from crucible.errors import CrucibleError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def field_error(
    model: str, field: str, value: Any, message: str, kind: str = "invalid_shape"
) -> ValidationError:
    """A validation error of ``model`` located at ``field``: a model-level check that still
    reports the field it is about (pydantic would otherwise put it at the section's root).

    Args:
        model: the model's class name.
        field: the field the message is about.
        value: its value.
        message: what is wrong.
        kind: pydantic's error type.
    """
    err = InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=value)
    return ValidationError.from_exception_data(model, [err])


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with user-facing errors."""
    p = Path(path)
    if not p.exists():
        raise CrucibleError(f"spec file {p} does not exist; pass the path of a YAML spec")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CrucibleError(f"{p}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise CrucibleError(f"{p}: not a UTF-8 text file; a spec must be YAML text") from None
    if data is None:
        raise CrucibleError(f"{p}: the spec is empty; it needs at least `kind:` and `name:`")
    if not isinstance(data, dict):
        raise CrucibleError(f"{p}: a spec must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise CrucibleError(
                f"override {item!r} is not of the form key.path=value (e.g. optim.lr=3e-4)"
            )
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise CrucibleError(f"override {item!r} has an empty key")
        value = _parse_scalar(raw)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise CrucibleError(f"override {item!r}: {path} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _parse_scalar(raw: str) -> Any:
    """A ``--set`` value as YAML would read it, plus floats like 3e-4 (YAML 1.1 misses them)."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid field names of the (sub)model found by walking ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: full dotted path, the value, and what is allowed."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            allowed = f" (valid keys here: {', '.join(valid)})" if valid and not close else ""
            lines.append(f"{source}: unknown key {path}{hint}{allowed}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {path} is required")
        else:
            value = e.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {path} = {shown} is invalid: {msg}")
    return "\n".join(lines)


def validate(model: type[M], data: dict[str, Any], source: str = "spec") -> M:
    """Validate ``data`` as ``model``, turning pydantic errors into :class:`CrucibleError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise CrucibleError(format_validation_error(e, model, source)) from None


def spec_hash(spec: BaseModel) -> str:
    """A stable sha256 of a spec's resolved content (key order independent)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
