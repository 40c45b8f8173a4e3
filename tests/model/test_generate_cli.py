"""``crucible generate`` (jobs/cli/generate.py) on a committed checkpoint written here.

The checkpoint is the ``tiny_checkpoint`` fixture (tests/conftest.py): real in all but
DeepSpeed's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.model.generate import generate
from crucible.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_checkpoint: tuple[Path, GPT]) -> tuple[Path, GPT]:
    return tiny_checkpoint


def test_greedy_completions_of_a_checkpoint(
    run: tuple[Path, GPT], train_shards: Path, cli: Any
) -> None:
    run_dir, model = run
    prompts = ["the cat of", "and to in a is that for it as was with the"]
    argv = ["generate", str(run_dir), "--temperature", "0", "--max-new-tokens", "9"]
    rc, out, err = cli([*argv, "--prompt", prompts[0], "--prompt", prompts[1]])
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


def test_sampling_is_seeded(run: tuple[Path, GPT], cli: Any) -> None:
    run_dir, _ = run
    argv = ["generate", str(run_dir / "checkpoints" / "step-3"), "--prompt", "the"]
    argv += ["--top-k", "50", "--top-p", "0.95", "--max-new-tokens", "20"]
    first = cli([*argv, "--seed", "1"])
    assert first[0] == 0, first[2]
    assert cli([*argv, "--seed", "1"]) == first
    assert cli([*argv, "--seed", "2"])[1] != first[1]


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
    cli: Any,
) -> None:
    run_dir, _ = run
    where = str(run_dir / "nowhere") if "--missing" in args else str(run_dir)
    args = [a for a in args if a != "--missing"]
    rc, out, err = cli(["generate", where, *args])
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err
