"""``crucible eval``: a checkpoint's perplexity on a shard split and, given a JSONL file of
prompts with references, the exact match of its greedy completions; printed, and written as
``eval.json`` and ``eval.md`` beside the checkpoint's run (``<run>/eval/step-<N>/``)."""

from __future__ import annotations

import typer

from crucible.errors import CrucibleError


def eval_cmd(
    checkpoint: str = typer.Argument(
        ...,
        help="A checkpoint (step-<N>), or a run directory (its newest valid checkpoint): a "
        "path or URI.",
    ),
    split: str = typer.Option("heldout", "--split", help="Shard split for the perplexity."),
    max_batches: int | None = typer.Option(
        None, "--max-batches", help="Evaluate only the first N batches of the split."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows (or prompts) per forward."),
    prompts: str | None = typer.Option(
        None, "--prompts", help='JSONL of {"prompt": ..., "reference": ...} for exact match.'
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Most tokens per answer."),
) -> None:
    """Perplexity of CHECKPOINT on its run's shards, and exact match on --prompts."""
    for bad, message in (
        (batch_size < 1, f"--batch-size must be at least 1, not {batch_size}"),
        (max_batches is not None and max_batches < 1, "--max-batches must be at least 1"),
        (max_new_tokens < 1, f"--max-new-tokens must be at least 1, not {max_new_tokens}"),
        (split not in ("heldout", "train"), f"--split is heldout or train, not {split!r}"),
    ):
        if bad:
            raise CrucibleError(message)
    import torch

    from crucible.cluster.storage import location
    from crucible.jobs import evaluation as ev
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.spec import PPORunSpec, TrainRunSpec, parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.export import load_model, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = ckpt.read_state(path)
    spec = parse_spec(state["spec"], source=str(path / ckpt.STATE))
    if not isinstance(spec, TrainRunSpec | PPORunSpec):
        raise CrucibleError(f"{path} is a checkpoint of a {spec.kind} run, not a language model's")
    prompt_set = ev.read_prompts(location(prompts)) if prompts else None  # before the weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path).to(device)
    # a PPO run's shards are its policy's: chat shards, examples masked from each other
    masked = spec.data.mask_cross_document if isinstance(spec, TrainRunSpec) else True
    ppl = ev.perplexity(model, spec.data.shards, split, batch_size, max_batches, masked)
    typer.echo(
        f"{split} loss {ppl['loss']:.4f}, perplexity {ppl['perplexity']:.2f} over "
        f"{ppl['tokens']:,.0f} tokens"
    )
    acc = None
    if prompt_set is not None:
        from crucible.data_pipeline.chat import TEMPLATES
        from crucible.data_pipeline.shards.manifest import read_manifest

        tok, eos = run_tokenizer(spec.data.shards)
        chat = read_manifest(location(spec.data.shards)).chat_template
        template = TEMPLATES[chat] if chat is not None else None
        acc = ev.prompt_accuracy(
            model, tok, eos, prompt_set, max_new_tokens, batch_size, template=template
        )
        skipped = f"; skipped {acc['skipped']}" if acc["skipped"] else ""
        typer.echo(f"exact match {acc['exact_match']:.1%} of {acc['evaluated']} prompts{skipped}")
    out = path.parent.parent / "eval" / path.name
    title = f"{spec.name} {path.name}"
    out.mkdirs()
    (out / "eval.json").write_json({"checkpoint": path.uri, "split": split, "perplexity": ppl,
                                    "prompts": acc})  # fmt: skip
    (out / "eval.md").write_text(ev.markdown_report(title, ppl, acc))
    typer.echo(f"report: {out / 'eval.md'}")
