"""Spec parsing: valid specs round-trip; every class of bad spec gives the promised message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crucible.cluster.storage import location
from crucible.config import apply_overrides
from crucible.errors import CrucibleError
from crucible.jobs.spec import dump_spec, load_spec, parse_spec, write_resolved

DATA = "data:\n  inputs: [corpus/]\n"
TRAIN = (
    "kind: train\nname: r\nmodel:\n  preset: tiny\ndata:\n  shards: runs/d/shards\n"
    "train:\n  max_steps: 10\n"
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_valid_spec_round_trips(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: data\nname: run-1\ncluster:\n  storage: /data/runs\n" + DATA)
    spec = load_spec(p)
    assert spec.kind == "data" and spec.cluster.storage == "/data/runs"
    again = parse_spec(yaml.safe_load(dump_spec(spec)))
    assert again == spec
    out = write_resolved(spec, location(tmp_path / "run"))
    assert load_spec(out.path) == spec


def test_unknown_key_names_path_and_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: data\nname: r\ncluster:\n  adress: local\n" + DATA)
    with pytest.raises(CrucibleError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "unknown key cluster.adress" in msg
    assert "did you mean cluster.address?" in msg


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: data\nname: r\nzzz: 1\n" + DATA)
    with pytest.raises(
        CrucibleError, match=r"unknown key zzz \(valid keys here: name, cluster, kind, data"
    ):
        load_spec(p)


def test_wrong_type_and_value_name_path_value_and_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: pretrain\nname: r\n")
    with pytest.raises(CrucibleError) as e:
        load_spec(p)
    assert 'kind = "pretrain" is invalid' in str(e.value)
    assert "use one of data, train, finetune, reward, rejection-sampling" in str(e.value)
    p = write(tmp_path, "kind: data\nname: 'bad name!'\n" + DATA)
    with pytest.raises(CrucibleError, match=r"name = \"bad name!\" is invalid: use letters"):
        load_spec(p)


def test_missing_field(tmp_path: Path) -> None:
    with pytest.raises(CrucibleError, match="name is required"):
        load_spec(write(tmp_path, "kind: data\n" + DATA))
    with pytest.raises(CrucibleError, match="data is required"):
        load_spec(write(tmp_path, "kind: data\nname: r\n"))
    with pytest.raises(CrucibleError, match="kind is required"):
        load_spec(write(tmp_path, "name: r\n"))
    with pytest.raises(CrucibleError, match="set train.max_steps or train.max_tokens"):
        load_spec(write(tmp_path, TRAIN.replace("max_steps: 10", "eval_every: 5")))


def test_sections_are_validated_by_their_owners(tmp_path: Path) -> None:
    bad_model = TRAIN.replace("preset: tiny", "preset: gpt3-175")
    with pytest.raises(
        CrucibleError, match=r"model.preset = \"gpt3-175\" is invalid: unknown preset"
    ):
        load_spec(write(tmp_path, bad_model))
    bad_data = "kind: data\nname: r\ndata:\n  inputs: [x]\n  dedup:\n    minhsh: {}\n"
    with pytest.raises(
        CrucibleError, match="unknown key data.dedup.minhsh; did you mean data.dedup.minhash"
    ):
        load_spec(write(tmp_path, bad_data))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [data\n", "invalid YAML at line"),
        ("", "the spec is empty"),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(CrucibleError, match=expected):
        load_spec(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CrucibleError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: data\nname: r\n" + DATA)
    spec = load_spec(p, ["cluster.storage=/x", "name=r2"])
    assert spec.cluster.storage == "/x" and spec.name == "r2"
    with pytest.raises(CrucibleError, match="unknown key cluster.storag"):
        load_spec(p, ["cluster.storag=/x"])
    with pytest.raises(CrucibleError, match="not of the form"):
        apply_overrides({}, ["justakey"])
    with pytest.raises(CrucibleError, match="is a value, not a section"):
        apply_overrides({"name": "r"}, ["name.x=1"])


def test_override_values_are_typed() -> None:
    out = apply_overrides({}, ["a.b=3e-4", "a.c=12", "a.d=true", "a.e=hello"])
    assert out == {"a": {"b": 3e-4, "c": 12, "d": True, "e": "hello"}}


def test_cli_reports_user_errors_in_one_line_without_traceback(tmp_path: Path) -> None:
    p = write(tmp_path, "kind: data\nname: r\ncluster:\n  adress: local\n" + DATA)
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "spec", "check", str(p)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {p}: unknown key cluster.adress; did you mean cluster.address?"
    ]


def test_cli_prints_resolved_spec(tmp_path: Path) -> None:
    p = write(tmp_path, TRAIN)
    r = subprocess.run(
        [sys.executable, "-m", "crucible", "spec", "check", str(p), "--set", "cluster.storage=/s"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert parse_spec(yaml.safe_load(r.stdout)).cluster.storage == "/s"
