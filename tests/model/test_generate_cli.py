"""``crucible generate`` (jobs/cli/generate.py) on a committed checkpoint written here.

The checkpoint is real in all but DeepSpeed's files: its manifest, sha256s, state and spec
are what a train run commits, and its shards are the test shard set with their tokenizer.
Only ZeRO's consolidation (``get_fp32_state_dict_from_zero_checkpoint``) is replaced: it
returns the state dict of a model saved here (a real ZeRO-3 save needs a multi-rank run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crucible.cluster.storage import location
from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.jobs.cli import main
from crucible.jobs.spec import parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.model.generate import generate
from crucible.model.gpt import GPT, build_model, init_weights
from crucible.model.presets import get_preset

MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run(tmp_path: Path, train_shards: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, GPT]:
    """A run directory with one committed checkpoint (step 3) of a tiny model."""
    spec = parse_spec(
        {
            "kind": "train",
            "name": "gen",
            "model": {"preset": "tiny", "init_std": 0.2},
            "data": {"shards": str(train_shards)},
            "train": {"num_workers": 1, "max_steps": 3},
        }
    )
    cfg = get_preset("tiny").model_copy(update={"init_std": 0.2})  # peaked logits: varied text
    model = init_weights(build_model(cfg), seed=4).eval()
    root = location(tmp_path / "gen" / "checkpoints")
    ckpt.clear_for_save(root, 3)
    stage = ckpt.stage_dir(root, 3, "test")
    (stage / "ds").mkdir(parents=True)
    (stage / "crucible_state").mkdir()
    (stage / ckpt.STATE).write_text(json.dumps({"step": 3, "spec": spec.model_dump(mode="json")}))
    torch.save(model.state_dict(), stage / "ds" / MODEL_FILE)
    (stage / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")
    (stage / "crucible_state" / "rank-0.pt").write_bytes(b"rng")
    ckpt.commit(root, 3, ckpt.hash_own_files(stage, 0, 1), 1)

    def consolidated(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
        return torch.load(Path(checkpoint_dir) / tag / MODEL_FILE)

    monkeypatch.setattr(
        "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint", consolidated
    )
    return tmp_path / "gen", model


def _crucible(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_completions_of_a_checkpoint(
    run: tuple[Path, GPT], train_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, model = run
    prompts = ["the cat of", "and to in a is that for it as was with the"]
    argv = ["generate", str(run_dir), "--temperature", "0", "--max-new-tokens", "9"]
    rc, out, err = _crucible([*argv, "--prompt", prompts[0], "--prompt", prompts[1]], capsys)
    assert rc == 0, err

    info = read_manifest(train_shards).tokenizer
    tok = load_tokenizer(train_shards / info.file)
    ids = [tok.encode(p).ids for p in prompts]
    new = generate(model, ids, 9, stop_tokens={info.eos_id})
    want = [
        p + tok.decode([t for t in n if t != info.eos_id])
        for p, n in zip(prompts, new, strict=True)
    ]
    assert out == f"{want[0]}\n---\n{want[1]}\n"
    assert len(out) > len("".join(prompts)) + 10  # something was generated


def test_sampling_is_seeded(run: tuple[Path, GPT], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run
    argv = ["generate", str(run_dir / "checkpoints" / "step-3"), "--prompt", "the"]
    argv += ["--top-k", "50", "--top-p", "0.95", "--max-new-tokens", "20"]
    first = _crucible([*argv, "--seed", "1"], capsys)
    assert first[0] == 0, first[2]
    assert _crucible([*argv, "--seed", "1"], capsys) == first
    assert _crucible([*argv, "--seed", "2"], capsys)[1] != first[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "error: --prompt is empty"),
        (["--prompt", "the", "--top-p", "0"], "error: --top-p must be in (0, 1]"),
        (["--prompt", "the", "--temperature", "-1"], "error: --temperature must be at least 0"),
        (["--prompt", "the", "--max-new-tokens", "200"], "exceeds the model's context of 128"),
        (["--prompt", "the", "--missing"], "is not a checkpoint"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    run: tuple[Path, GPT],
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir, _ = run
    where = str(run_dir / "nowhere") if "--missing" in args else str(run_dir)
    args = [a for a in args if a != "--missing"]
    rc, out, err = _crucible(["generate", where, *args], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err
