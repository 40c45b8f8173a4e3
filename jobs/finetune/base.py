"""The base model of a finetune run: its shape and tokenizer (read at submission), its
weights converted once into the run directory (a Ray task on the driver's behalf), and
loaded into the workers' model before DeepSpeed wraps it.

Weights go to ``<run>/base/model.safetensors`` (crucible's parameter names, fp32; a tied
head stored once) with ``base/info.json`` beside it, written last: its presence marks the
conversion complete, so a restart reuses it. Rank 0 reads the file memory-mapped, one tensor
at a time, and under ZeRO-3 each parameter is gathered, filled on rank 0 and re-partitioned,
so no rank ever holds the whole model twice.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.storage import (
    Location,
    cache_key,
    location,
    scratch_dir,
    sha256_file,
)
from crucible.errors import CrucibleError
from crucible.jobs.finetune.spec import BaseSpec
from crucible.model.config import ModelConfig

if TYPE_CHECKING:
    from crucible.jobs.spec import FinetuneRunSpec

WEIGHTS = "model.safetensors"
INFO = "info.json"


def base_config(base: BaseSpec) -> ModelConfig:
    """The model shape of ``base``.

    Raises:
        CrucibleError: no checkpoint or HF model there, or an architecture crucible lacks.
    """
    if base.checkpoint is not None:
        from crucible.jobs.train import checkpoint as ckpt
        from crucible.jobs.train.export import resolve_checkpoint

        state = ckpt.read_state(resolve_checkpoint(base.checkpoint))
        from crucible.model.spec import ModelSpec

        model = {k: v for k, v in state["spec"]["model"].items() if k != "parallel"}
        return ModelSpec.model_validate(model).resolve()
    assert base.hf is not None
    from transformers import AutoConfig

    from crucible.model.hf import config_from_hf

    if not (location(base.hf) / "config.json").is_file():
        raise CrucibleError(
            f"base.hf {base.hf} has no config.json; give a Hugging Face model directory "
            "(save_pretrained's output)"
        )
    try:  # config.json read through the storage layer: a local path or an object-store URI
        hf = AutoConfig.for_model(**(location(base.hf) / "config.json").read_json())
    except (OSError, ValueError, KeyError) as e:
        raise CrucibleError(
            f"base.hf {base.hf} is not a Hugging Face model directory ({e})"
        ) from None
    return config_from_hf(hf)


def base_tokenizer(base: BaseSpec) -> Location:
    """Where ``base``'s ``tokenizer.json`` is: the pretraining run's shards, or the HF
    directory."""
    if base.checkpoint is not None:
        from crucible.jobs.train import checkpoint as ckpt
        from crucible.jobs.train.export import resolve_checkpoint

        state = ckpt.read_state(resolve_checkpoint(base.checkpoint))
        return location(state["spec"]["data"]["shards"]) / "tokenizer.json"
    assert base.hf is not None
    return location(base.hf) / "tokenizer.json"


def check_base(spec: FinetuneRunSpec, shards_fingerprint: str) -> None:
    """Refuse a model shape other than the base's, or shards of another tokenizer.

    Args:
        spec: the finetune spec.
        shards_fingerprint: the chat shards' tokenizer fingerprint.
    """
    from crucible.data_pipeline.tokens.tokenizer import load_tokenizer, tokenizer_fingerprint

    have, want = spec.model.resolve(), base_config(spec.base)
    diff = [k for k in ModelConfig.model_fields if getattr(have, k) != getattr(want, k)]
    if diff:
        k = diff[0]
        raise CrucibleError(
            f"model.{k} is {getattr(have, k)!r} but the base model's is {getattr(want, k)!r}; "
            "a finetune run keeps the base's shape (give only model.parallel)"
        )
    tok = base_tokenizer(spec.base)
    try:
        fp = tokenizer_fingerprint(load_tokenizer(tok))
    except (FileNotFoundError, CrucibleError):
        raise CrucibleError(f"the base model's tokenizer {tok} cannot be read") from None
    if fp != shards_fingerprint:
        raise CrucibleError(
            f"shards {spec.data.shards} were tokenized with another tokenizer than the base "
            f"model's ({tok}); rebuild them with data.shards.tokenizer.path: {tok}"
        )


def base_state_dict(base: BaseSpec) -> dict[str, torch.Tensor]:
    """The base's full state dict in crucible's parameter names (reads the whole model)."""
    if base.checkpoint is not None:
        from crucible.jobs.train.export import consolidate, resolve_checkpoint

        sd, _ = consolidate(resolve_checkpoint(base.checkpoint))
        return sd
    assert base.hf is not None
    from transformers import AutoModelForCausalLM

    from crucible.model.hf import from_hf

    src = location(base.hf)
    with tempfile.TemporaryDirectory(dir=scratch_dir("base-hf")) as tmp:
        local = src.local_path if src.is_local else Path(tmp) / "model"
        if not src.is_local:  # a flat directory (config, weights, tokenizer): file by file
            for name in src.ls():
                if (src / name).is_file():
                    (src / name).download(local / name)
        hf = AutoModelForCausalLM.from_pretrained(local, local_files_only=True, dtype=torch.float32)
        return from_hf(hf).state_dict()


def convert_base(base: dict[str, Any], out: str) -> str:
    """Write the base's weights and ``info.json`` into ``out`` (a Ray task); return ``out``.

    Args:
        base: the ``base`` section as a mapping.
        out: ``<run>/base`` (a URI).
    """
    from safetensors.torch import save_file

    spec = BaseSpec.model_validate(base)
    cfg = base_config(spec)
    sd = base_state_dict(spec)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    dest = location(out)
    with (dest / WEIGHTS).writing() as pending:
        save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(pending.path))
        digest, size = sha256_file(pending.path), pending.path.stat().st_size
    info = {"base": spec.model_dump(mode="json"), "config": cfg.model_dump(mode="json"),
            "parameters": sum(v.numel() for v in sd.values()), "sha256": digest,
            "bytes": size}  # fmt: skip
    (dest / INFO).write_text(json.dumps(info, indent=1))
    return out


def prepare_base(spec: FinetuneRunSpec, run_dir: Location, use_ray: bool = True) -> Location:
    """Convert the base's weights into ``<run>/base`` unless a conversion of this very base
    is there.

    Args:
        spec: the finetune spec.
        run_dir: the run directory.
        use_ray: read the base in a Ray task (node-local memory, not the driver's); False
            converts in this process (one node without Ray).
    """
    out = run_dir / "base"
    info = out / INFO
    base = spec.base.model_dump(mode="json")
    if info.is_file() and info.read_json().get("base") == base:
        return out
    if use_ray:
        import ray

        ray.get(ray.remote(num_cpus=1)(convert_base).remote(base, out.uri))
    else:
        convert_base(base, out.uri)
    return out


def local_weights(base_dir: Location) -> Path:
    """A local path of ``<run>/base/model.safetensors`` (downloaded once per node from an
    object store)."""
    f = base_dir / WEIGHTS
    if f.is_local:
        return f.local_path
    from filelock import FileLock

    info = (base_dir / INFO).read_json()
    cache = scratch_dir("base", cache_key(f.uri + info["sha256"]))
    with FileLock(str(cache / ".lock")):
        if not (cache / WEIGHTS).is_file():  # downloads are atomic: present means checked
            f.download(cache / WEIGHTS, info["sha256"], info["bytes"])
    return cache / WEIGHTS


NEW_HEADS = {"score.weight"}  # parameters of a model built on the base that it does not have


def load_base(model: torch.nn.Module, base_dir: Location, rank: int) -> None:
    """Copy the base's weights into ``model`` (plain, or partitioned by ZeRO-3) before
    ``deepspeed.initialize`` builds its master copies from them.

    Args:
        model: the :class:`~crucible.model.gpt.GPT` of this rank.
        base_dir: ``<run>/base``.
        rank: this rank (rank 0 reads the file and fills each gathered parameter).
    """
    import deepspeed
    from safetensors import safe_open

    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    # Every rank checks names and shapes from the file's header first (the same outcome
    # everywhere), so no rank raises while the others wait in a gather.
    with safe_open(str(local_weights(base_dir)), "pt") as f:
        names = set(f.keys())
        for name, p in model.named_parameters():
            if name in NEW_HEADS and name not in names:
                continue
            if name not in names:
                raise CrucibleError(f"the base weights in {base_dir} lack parameter {name}")
            shape = tuple(getattr(p, "ds_shape", None) or p.shape)
            if tuple(f.get_slice(name).get_shape()) != shape:
                raise CrucibleError(
                    f"base parameter {name} has shape {tuple(f.get_slice(name).get_shape())}, "
                    f"the model {shape}"
                )
        for name, p in model.named_parameters():
            if name not in names:  # a new head (a reward model's score on a language model)
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
                if rank == 0 or not zero3:
                    with torch.no_grad():
                        p.copy_(f.get_tensor(name).to(p.dtype))
