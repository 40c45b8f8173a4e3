"""What ``crucible resume`` may change in a run's spec, its record of the changes, and a
finished run left alone (run directories built by hand; no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crucible.cluster.storage import location, read_jsonl
from crucible.config import apply_overrides
from crucible.errors import CrucibleError
from crucible.jobs.resume_check import (
    HISTORY,
    check_resume_changes,
    finished_step,
    record_if_applied,
    safe_on_resume,
)
from crucible.jobs.runs import load_run_spec, prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec


def _spec(tmp_path: Path, **train: Any) -> TrainRunSpec:
    spec = parse_spec(
        {
            "kind": "train",
            "name": "r",
            "cluster": {"storage": str(tmp_path / "runs")},
            "model": {"preset": "tiny"},
            "data": {"shards": str(tmp_path / "no-shards")},
            "optim": {"global_batch_size": 16, "micro_batch_size": 4},
            "train": {"num_workers": 2, "max_steps": 20, **train},
        }
    )
    assert isinstance(spec, TrainRunSpec)
    return spec


def _with(spec: TrainRunSpec, *sets: str) -> TrainRunSpec:
    new = parse_spec(apply_overrides(spec.model_dump(mode="json"), list(sets)))
    assert isinstance(new, TrainRunSpec)
    return new


def _checkpoint(run: Path, step: int, total_steps: int, spec: Any) -> None:
    """A committed 1-rank checkpoint's manifest and crucible state (no real shards)."""
    d = run / "checkpoints" / f"step-{step}"
    files = [
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "crucible_state/rank-0.pt",
    ]
    state = {"step": step, "total_steps": total_steps, "spec": spec.model_dump(mode="json")}
    location(d / "crucible_state" / "state.json").write_json(state)
    manifest = {"files": {f: {"size": 0, "sha256": ""} for f in files}, "world_size": 1}
    location(d / "manifest.json").write_json(manifest)


@pytest.mark.parametrize(
    "sets",
    [
        ("train.num_workers=1",),
        ("train.use_gpu=true", "train.hang_timeout_s=60", "train.gpu_hour_budget=5"),
        ("cluster.address=http://other:8265", "cluster.gpu=h100-sxm"),
        ("monitoring.loggers=[tensorboard]", "checkpoint.keep_last=5"),
        ("train.max_steps=40",),
        ("model.parallel.activation_checkpointing=true",),
    ],
)
def test_safe_changes_pass_and_are_recorded(tmp_path: Path, sets: tuple[str, ...]) -> None:
    old = _spec(tmp_path)
    run = prepare_run(old)
    new = _with(old, *sets)
    changes = check_resume_changes(old, new)
    assert changes and all(safe_on_resume(k) for k in changes)
    record_if_applied(run, new, changes)
    assert not (run / HISTORY).exists()  # nothing recorded until the spec is written
    prepare_run(new, resume=True)
    record_if_applied(run, new, changes)
    (entry,) = read_jsonl(run / HISTORY)
    assert entry["changes"] == {k: list(v) for k, v in changes.items()}
    assert entry["time"] > 0
    assert load_run_spec(run) == new


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.preset", "gpt2-small"),
        ("model.n_layers", "4"),
        ("model.parallel.zero_stage", "2"),
        ("model.parallel.precision", "fp32"),
        ("data.shards", "/elsewhere"),
        ("data.seed", "7"),
        ("optim.lr", "0.01"),
        ("optim.global_batch_size", "32"),
        ("optim.micro_batch_size", "2"),
        ("optim.schedule", "wsd"),
        ("train.seed", "3"),
        ("cluster.storage", "/other"),
    ],
)
def test_unsafe_change_is_refused_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    old = _spec(tmp_path)
    prepare_run(old)
    new = _with(old, "train.num_workers=1", f"{key}={value}")
    with pytest.raises(CrucibleError, match=rf"^resume cannot change {key} \(") as e:
        check_resume_changes(old, new)
    assert "\n" not in str(e.value) and "start a new run" in str(e.value)


def test_refusal_shows_old_and_new_value(tmp_path: Path) -> None:
    old = _spec(tmp_path)
    with pytest.raises(CrucibleError) as e:
        check_resume_changes(old, _with(old, "model.preset=gpt2-small"))
    assert str(e.value) == (
        "resume cannot change model.preset (tiny → gpt2-small); start a new run with another name"
    )


def test_finished_run_is_detected(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    run = prepare_run(spec)
    assert finished_step(run, spec) is None  # no checkpoint yet
    _checkpoint(Path(run.path), 10, 20, spec)
    assert finished_step(run, spec) is None  # half-way
    _checkpoint(Path(run.path), 20, 20, spec)
    assert finished_step(run, spec) == 20
    assert finished_step(run, _with(spec, "train.max_steps=40")) is None  # extended: resumes


def test_finished_token_budget_run(tmp_path: Path) -> None:
    # tiny's context, no shards manifest: 16 rows × seq tokens per step.
    spec = _spec(tmp_path, max_steps=None, max_tokens=1e6)
    run = prepare_run(spec)
    _checkpoint(Path(run.path), 7, 7, spec)
    assert finished_step(run, spec) == 7  # the checkpoint's own total
    assert finished_step(run, _with(spec, "train.max_tokens=1e12")) is None


def _ppo_spec(tmp_path: Path, *sets: str) -> Any:
    data = {
        "kind": "ppo", "name": "p", "cluster": {"storage": str(tmp_path / "runs")},
        "policy": str(tmp_path / "sft"), "reward": str(tmp_path / "rm"),
        "prompts": [str(tmp_path / "prompts.jsonl")],
        "model": {"preset": "tiny"}, "data": {"shards": str(tmp_path / "no-shards")},
        "ppo": {"steps": 20}, "workers": {"num_workers": 2},
    }  # fmt: skip
    return parse_spec(apply_overrides(data, list(sets)))


def test_a_ppo_run_may_change_its_workers_and_steps_only(tmp_path: Path) -> None:
    spec = _ppo_spec(tmp_path)
    changes = check_resume_changes(
        spec, _ppo_spec(tmp_path, "workers.num_workers=1", "ppo.steps=30", "workers.use_gpu=true")
    )
    assert changes == {"workers.num_workers": (2, 1), "workers.use_gpu": (None, True),
                       "ppo.steps": (20, 30)}  # fmt: skip
    for key in ("workers.seed=1", "ppo.epochs=2", "optim.actor_lr=1e-3", "rollout.top_k=5"):
        with pytest.raises(CrucibleError, match=f"resume cannot change {key.split('=')[0]} "):
            check_resume_changes(spec, _ppo_spec(tmp_path, key))


def test_a_finished_ppo_run_is_detected(tmp_path: Path) -> None:
    spec = _ppo_spec(tmp_path)
    run = prepare_run(spec)
    _checkpoint(Path(run.path), 10, 20, spec)
    assert finished_step(run, spec) is None
    _checkpoint(Path(run.path), 20, 20, spec)
    assert finished_step(run, spec) == 20
    assert finished_step(run, _ppo_spec(tmp_path, "ppo.steps=22")) is None


def test_resume_cli_refuses_and_skips_finished_before_any_submission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from crucible.jobs.cli import main

    def no_submit(*_: Any, **__: Any) -> None:
        raise AssertionError("submitted")

    monkeypatch.setattr("crucible.jobs.submit.submit_run", no_submit)
    spec = _spec(tmp_path)
    run = Path(prepare_run(spec).path)
    before = (run / "spec.resolved.yaml").read_text()
    resume = ["resume", "r", "--storage", str(tmp_path / "runs"), "--set"]

    with pytest.raises(SystemExit) as e:
        main([*resume, "optim.lr=0.01"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: resume cannot change optim.lr (") and err.count("\n") == 1
    assert (run / "spec.resolved.yaml").read_text() == before

    _checkpoint(run, 20, 20, spec)
    main([*resume, "train.num_workers=1"])  # returns: exit 0
    assert "run r is finished" in capsys.readouterr().out
    assert (run / "spec.resolved.yaml").read_text() == before
    assert not (run / HISTORY).exists()


def test_resume_cli_records_an_accepted_change_once_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from crucible.jobs.cli import main

    def fake_submit(spec: TrainRunSpec, resume: bool = False) -> tuple[None, str, Any]:
        return None, "job-1", prepare_run(spec, resume=resume)

    monkeypatch.setattr("crucible.jobs.submit.submit_run", fake_submit)
    spec = _spec(tmp_path)
    run = prepare_run(spec)
    _checkpoint(Path(run.path), 10, 20, spec)
    main(["resume", "r", "--storage", str(tmp_path / "runs"), "--detach", "--set",
          "train.num_workers=1"])  # fmt: skip
    assert "submitted job job-1" in capsys.readouterr().out
    (entry,) = read_jsonl(run / HISTORY)
    assert entry["changes"] == {"train.num_workers": [2, 1]}
    assert load_run_spec(run).train.num_workers == 1  # type: ignore[union-attr]


def test_readme_lists_every_safe_key() -> None:
    from crucible.jobs.resume_check import SAFE_ON_RESUME, UNSAFE_ON_RESUME

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for key in SAFE_ON_RESUME + UNSAFE_ON_RESUME:
        shown = f"`{key}*`" if key.endswith(".") else key.rsplit(".", 1)[-1]
        assert shown in readme, key
