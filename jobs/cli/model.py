"""``crucible model info|list``: shapes, parameter counts, FLOPs and memory of a model.

Nothing here allocates weights: every figure comes from :mod:`crucible.model.accounting`,
so ``crucible model info gpt3-175b`` answers in about a second.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from crucible.config import load_yaml
from crucible.model.accounting import (
    hardware_flops_per_token,
    largest_layer_params,
    model_flops_per_token,
    model_state_bytes,
    num_non_embedding_params,
    num_params,
)
from crucible.model.config import ModelConfig
from crucible.model.presets import PRESETS
from crucible.model.spec import resolve_model

app = typer.Typer(
    help="Inspect model shapes: parameters, FLOPs per token, memory.", no_args_is_help=True
)


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]:
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _count(n: int) -> str:
    for scale, suffix in [(1e9, "B"), (1e6, "M"), (1e3, "K")]:
        if n >= scale:
            return f"{n / scale:.2f}{suffix} ({n:,})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for scale, unit in [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]:
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def load_model_config(preset_or_spec: str) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name or a YAML file.

    The file may be a whole run spec (its ``model:`` section is used) or just a model section.

    Args:
        preset_or_spec: a preset name (see ``crucible model list``) or a path to YAML.
    """
    path = Path(preset_or_spec)
    if preset_or_spec.endswith((".yaml", ".yml")) or path.is_file():
        data = load_yaml(path)
        section = data.get("model", data)
        return resolve_model(section, source=f"{path}: model")
    return resolve_model(preset_or_spec)


def describe_model(cfg: ModelConfig, seq_len: int | None = None) -> list[tuple[str, str]]:
    """(label, value) rows describing ``cfg``: shape, counts, FLOPs/token, bf16 memory.

    Args:
        cfg: the model shape.
        seq_len: sequence length for the attention FLOPs (default: ``cfg.max_seq_len``).
    """
    t = seq_len or cfg.max_seq_len
    state = model_state_bytes(cfg, "bf16")
    attn = "MHA" if cfg.kv_heads == cfg.n_heads else ("MQA" if cfg.kv_heads == 1 else "GQA")
    arch = (
        "decoder (causal, pre-norm)" if cfg.arch == "gpt" else "encoder (bidirectional, post-norm)"
    )
    return [
        ("architecture", f"{cfg.arch}: {arch}"),
        ("layers", str(cfg.n_layers)),
        ("d_model", str(cfg.d_model)),
        ("heads (q / kv) × head dim", f"{cfg.n_heads} / {cfg.kv_heads} ({attn}) × {cfg.head_dim}"),
        ("ffn", f"{cfg.ffn_dim} ({cfg.mlp})"),
        ("vocab / context", f"{cfg.vocab_size} / {cfg.max_seq_len}"),
        (
            "positions / norm / bias / tied",
            f"{cfg.pos} / {cfg.norm} / {cfg.bias} / {cfg.tie_embeddings}",
        ),
        ("parameters", _count(num_params(cfg))),
        ("non-embedding parameters", _count(num_non_embedding_params(cfg))),
        ("largest layer (ZeRO-3 estimator)", _count(largest_layer_params(cfg))),
        (f"model FLOPs/token (6N+12LHQT, T={t})", _si(model_flops_per_token(cfg, t), "FLOP")),
        ("hardware FLOPs/token (+recompute)", _si(hardware_flops_per_token(cfg, t), "FLOP")),
        ("bf16 weights", _bytes(state["weights"])),
        ("bf16 gradients", _bytes(state["grads"])),
        ("fp32 master + Adam m, v", _bytes(state["master"] + state["adam_m"] + state["adam_v"])),
        ("model states total (16 B/param)", _bytes(state["total"])),
    ]


@app.command("info")
def info(
    preset_or_spec: str = typer.Argument(..., help="A preset name or a YAML spec file."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Sequence length for FLOPs (default: context)."
    ),
) -> None:
    """Shape, parameters, FLOPs per token and training memory of PRESET_OR_SPEC."""
    cfg = load_model_config(preset_or_spec)
    table = Table(title=f"model {preset_or_spec}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in describe_model(cfg, seq_len):
        table.add_row(label, value)
    Console().print(table)


@app.command("list")
def list_() -> None:
    """Every preset with its shape and parameter count."""
    table = Table(title="model presets")
    table.add_column("preset", no_wrap=True)
    for col in ["params", "layers", "d_model", "q/kv", "ffn", "context", "vocab"]:
        table.add_column(col, justify="right")
    for name, cfg in PRESETS.items():
        table.add_row(
            name,
            _count(num_params(cfg)).split(" ")[0],
            str(cfg.n_layers),
            str(cfg.d_model),
            f"{cfg.n_heads}/{cfg.kv_heads}",
            str(cfg.ffn_dim),
            str(cfg.max_seq_len),
            str(cfg.vocab_size),
        )
    Console().print(table)
