"""``crucible generate``: complete prompts with a checkpoint's model, on this machine.

The weights are the checkpoint's consolidated fp32 master weights (as ``crucible export``
gathers them); the tokenizer is the one the run's shards were encoded with, found through
the shards' manifest, and its EOS token ends a completion. A model fine-tuned on chat shards
gets each prompt as a user turn in the shards' chat template and answers as the assistant:
what it prints is the answer, up to the template's end marker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def run_tokenizer(shards: str) -> tuple[Tokenizer, int]:
    """The tokenizer a run's shards were encoded with, and its EOS id, from their manifest.

    Args:
        shards: the run's ``data.shards`` (path or URI).
    """
    from crucible.cluster.storage import location
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.data_pipeline.tokens.tokenizer import load_tokenizer

    try:
        info = read_manifest(shards).tokenizer
    except CrucibleError as e:
        raise CrucibleError(f"the run's tokenizer is not found: {e}") from None
    return load_tokenizer(location(shards) / info.file), info.eos_id


def generate_cmd(
    checkpoint: str = typer.Argument(
        ...,
        help="A checkpoint (step-<N>), or a run directory (its newest valid checkpoint): a "
        "path or URI.",
    ),
    prompt: list[str] = typer.Option(
        ..., "--prompt", help="Text to continue (repeatable: one batch)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens per completion."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 for greedy decoding."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k likeliest tokens."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: probability mass kept."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
) -> None:
    """Print a completion of each --prompt by CHECKPOINT's model (ends at the run's EOS)."""
    if any(not p for p in prompt):
        raise CrucibleError("--prompt is empty; give the text to continue")
    for bad, message in (
        (max_new_tokens < 1, f"--max-new-tokens must be at least 1, not {max_new_tokens}"),
        (temperature < 0, f"--temperature must be at least 0, not {temperature}"),
        (top_k is not None and top_k < 1, f"--top-k must be at least 1, not {top_k}"),
        (not 0 < top_p <= 1, f"--top-p must be in (0, 1], not {top_p}"),
    ):
        if bad:
            raise CrucibleError(message)
    import torch

    from crucible.jobs.spec import PPORunSpec, TrainRunSpec, parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.export import load_model, resolve_checkpoint
    from crucible.model.generate import generate

    path = resolve_checkpoint(checkpoint)
    spec = parse_spec(ckpt.read_state(path)["spec"], source=str(path / ckpt.STATE))
    if not isinstance(spec, TrainRunSpec | PPORunSpec):
        raise CrucibleError(f"{path} is a checkpoint of a {spec.kind} run, not a language model's")
    from crucible.data_pipeline.chat import TEMPLATES, generation_prompt
    from crucible.data_pipeline.shards.manifest import read_manifest

    tok, eos = run_tokenizer(spec.data.shards)
    chat = read_manifest(spec.data.shards).chat_template
    template = TEMPLATES[chat] if chat is not None else None
    texts = [generation_prompt([("user", p)], template) if template else p for p in prompt]
    ids = [tok.encode(t).ids for t in texts]
    if not all(ids):
        raise CrucibleError("a --prompt encodes to no tokens; give text the tokenizer knows")
    context = spec.model.resolve().max_seq_len
    longest = max(len(i) for i in ids)
    if longest + max_new_tokens > context:
        raise CrucibleError(
            f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} exceeds the "
            f"model's context of {context} tokens"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    outs = generate(model, ids, max_new_tokens, temperature, top_k, top_p, {eos}, gen)
    for i, (text, new) in enumerate(zip(prompt, outs, strict=True)):
        if i:
            typer.echo("---")
        completion = tok.decode([t for t in new if t != eos])
        if template is not None:
            typer.echo(completion.split(template.end)[0])
        else:
            typer.echo(text + completion)
