"""Weight-only int8 quantisation through torchao, for running a trained GPT in PyTorch on a
laptop's CPU (or a GPU) with half the memory of bf16 weights and a quarter of fp32's.

Every ``nn.Linear`` weight becomes torchao's ``Int8WeightOnlyConfig`` tensor (symmetric, one
scale per output channel); activations, embeddings and norms stay in the model's dtype. A
tied output projection is quantised as a linear layer of its own, so the file holds the
embedding table in full precision and the projection in int8.

The file is what torchao documents for serialisation: ``torch.save`` of the quantised state
dict, loaded into a model built on the meta device with ``assign=True``; the model's config
sits beside it as ``<file>.config.json``. Loading needs torchao (``pip install
crucible[export]``). torchao's 4-bit weight-only configs need its GPU kernels (``mslk``) in the
version tested, so ``int8`` is the one width offered here; 4-bit files for CPUs come from the
GGUF export (q4_0, q4_k_m through llama.cpp).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model

QUANTS = ("int8",)


def _torchao() -> None:
    # torchao logs a warning for every CUDA kernel library it cannot load on a CPU machine
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise CrucibleError(
            "torchao is not installed: pip install 'crucible[export]' (or torchao)"
        ) from None


def quantize(model: GPT, quant: str = "int8") -> GPT:
    """Quantise ``model``'s linear weights in place; return it.

    Args:
        model: a materialised GPT (fp32 or bf16).
        quant: ``int8``.
    """
    if quant not in QUANTS:
        raise CrucibleError(f"--quant {quant!r} is not one of {', '.join(QUANTS)} for torchao")
    _torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if model.cfg.tie_embeddings:  # the projection becomes its own (int8) weight
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    quantize_(model, Int8WeightOnlyConfig())
    return model


def save_quantized(model: GPT, out: Path, quant: str) -> Path:
    """Write a quantised model's state dict to ``out`` and its config beside it.

    Args:
        model: from :func:`quantize`.
        out: the file to write.
        quant: the quantisation it went through (recorded in the config file).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    config = {"model": model.cfg.model_dump(mode="json"), "torchao": quant}
    out.with_name(out.name + ".config.json").write_text(json.dumps(config, indent=1))
    return out


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A model from a file :func:`save_quantized` wrote, ready to generate.

    Args:
        path: the state dict file (its ``.config.json`` beside it).
        device: where the weights go.
    """
    _torchao()
    path = Path(path)
    try:
        config = json.loads(path.with_name(path.name + ".config.json").read_text())
    except FileNotFoundError:
        raise CrucibleError(f"{path}.config.json is missing: not a torchao export") from None
    cfg = ModelConfig.model_validate(config["model"])
    model = build_model(cfg, device="meta")
    state = torch.load(path, map_location=device, weights_only=False)  # torchao's subclasses
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
