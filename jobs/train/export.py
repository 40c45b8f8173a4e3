"""Export a ZeRO-3 checkpoint: every rank's shards gathered into one state dict, written as a
torch file or a Hugging Face ``transformers`` directory.

Consolidation is DeepSpeed's own (``get_fp32_state_dict_from_zero_checkpoint``, the fp32
master weights, not the bf16 working copy); the HF conversion is ``crucible.model.hf``'s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from crucible.cluster.storage import Location, download_dir, location, scratch_dir
from crucible.errors import CrucibleError
from crucible.jobs.train import checkpoint as ckpt
from crucible.model.bert import Bert
from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model
from crucible.model.spec import ModelSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_checkpoint(path: str | Path | Location) -> Location:
    """A ``step-<N>`` directory from itself, a checkpoints directory or a run directory
    (the newest valid checkpoint of the latter two); paths or URIs.

    Args:
        path: what the user gave.

    Raises:
        CrucibleError: no valid checkpoint there.
    """
    loc = location(path)
    if (loc / ckpt.MANIFEST).is_file() or (loc / ckpt.STATE).is_file():
        bad = ckpt.verify(loc, "size")  # sizes here; every byte's sha256 when it is read
        if bad:
            raise CrucibleError(f"checkpoint {loc} is not valid: {bad}")
        return loc
    for root in (loc / "checkpoints", loc):
        if ckpt.committed_steps(root):
            found = ckpt.latest_valid(root, "size")
            if found is None:
                raise CrucibleError(f"no checkpoint under {root} verifies; see the warnings")
            return found
    raise CrucibleError(
        f"{loc} is not a checkpoint (step-<N> with manifest.json), a checkpoints directory "
        "or a run directory with checkpoints"
    )


@contextlib.contextmanager
def local_checkpoint(checkpoint: Location) -> Iterator[Path]:
    """A local copy of a committed checkpoint, every file checked against its sha256: a
    node-local download from an object store, removed afterwards.

    Args:
        checkpoint: a committed ``step-<N>`` directory.

    Raises:
        CrucibleError: a file is missing or corrupt.
    """
    if checkpoint.is_local:
        bad = ckpt.verify(checkpoint, "sha256")
        if bad:
            raise CrucibleError(f"checkpoint {checkpoint} is not valid: {bad}")
        yield checkpoint.local_path
        return
    work = scratch_dir("export", uuid.uuid4().hex[:12])
    try:
        download_dir(checkpoint, work / checkpoint.name)
        yield work / checkpoint.name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def consolidate(checkpoint: Location | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The full fp32 state dict of a ZeRO checkpoint and the model config it belongs to.

    Args:
        checkpoint: a committed ``step-<N>`` directory (path or location).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from crucible.jobs.spec import parse_spec

    loc = location(checkpoint)
    state = ckpt.read_state(loc)
    spec = parse_spec(state["spec"], source=str(loc / ckpt.STATE))
    cfg = spec.model.resolve()  # type: ignore[union-attr]
    with local_checkpoint(loc) as local:
        ds = local / ckpt.DS_TAG
        if any(ds.glob("*optim_states.pt")):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=ckpt.DS_TAG)
        else:  # ZeRO stage 0 in fp32: the whole model, optimizer included, in one file
            states = torch.load(
                ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
            )
            module = states["module"]
            sd = {k: v.float() for k, v in module.items()}
    return dict(sd), cfg


def load_model(
    checkpoint: str | Path | Location,
    dtype: str = "fp32",
    reward_ok: bool = False,
    encoder_ok: bool = False,
) -> GPT:
    """A plain :class:`GPT` holding a checkpoint's consolidated weights (a LoRA run's
    adapters merged in), or a reward run's :class:`~crucible.model.reward.RewardModel`, or a
    :class:`~crucible.model.bert.Bert`.

    Args:
        checkpoint: a ``step-<N>`` directory, checkpoints directory or run directory.
        dtype: ``fp32`` or ``bf16``.
        reward_ok: the caller takes a reward model (else one is refused: it does not
            generate).
        encoder_ok: the caller takes a BERT (else one is refused: it does not generate).

    Raises:
        CrucibleError: a reward model or BERT the caller does not take.
    """
    path = resolve_checkpoint(checkpoint)
    spec = ckpt.read_state(path)["spec"]
    if ModelSpec.model_validate(spec["model"]).resolve().arch == "bert" and not encoder_ok:
        raise CrucibleError(
            f"{path} is a BERT (model.arch bert): an encoder, it does not generate; export "
            "it with --format hf or torch"
        )
    if spec.get("kind") == "reward":
        if not reward_ok:
            raise CrucibleError(
                f"{path} is a reward model (kind: reward): it scores answers and has no "
                "language-model head; export it with --format torch"
            )
        from crucible.model.reward import RewardModel

        sd, cfg = consolidate(path)
        reward = build_model(cfg, device="meta", cls=RewardModel)
        reward.load_state_dict(sd, strict=True, assign=True)
        return reward.to(DTYPES[dtype]).eval()
    sd, cfg = consolidate(path)
    lora = spec.get("lora")
    if lora is not None:  # a LoRA run: the adapters merged into the base's weights
        from safetensors.torch import load_file

        from crucible.jobs.finetune.base import local_weights
        from crucible.jobs.finetune.lora import merge_lora
        from crucible.jobs.finetune.spec import LoraSpec

        base = load_file(str(local_weights(path.parent.parent / "base")))
        merged = merge_lora(sd, cfg, LoraSpec.model_validate(lora), base)
        return merged.to(DTYPES[dtype]).eval()
    model = build_model(cfg, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    # assign=True loads each name separately; share tied tables again
    if isinstance(model, Bert):
        model.tie_weights()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(DTYPES[dtype]).eval()


def export_checkpoint(
    checkpoint: str | Path | Location,
    fmt: Literal["torch", "hf"],
    out: Path,
    dtype: Literal["fp32", "bf16"] = "fp32",
) -> Path:
    """Write a checkpoint's consolidated weights to ``out``; return what was written.

    ``torch``: ``out`` is a ``torch.save``'d state dict (GPT parameter names) with
    ``<out>.config.json`` (the :class:`ModelConfig`) beside it. ``hf``: ``out`` is a
    directory that ``AutoModelForCausalLM.from_pretrained`` loads (GPT-2 or LLaMA classes;
    ``BertForPreTraining`` for a BERT), with the run's ``tokenizer.json`` when the shards
    have one.

    Args:
        checkpoint: a ``step-<N>`` directory, checkpoints directory or run directory.
        fmt: ``torch`` or ``hf``.
        out: output file (torch) or directory (hf).
        dtype: ``fp32`` or ``bf16`` weights.
    """
    if dtype not in DTYPES:
        raise CrucibleError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_checkpoint(checkpoint)
    model = load_model(path, dtype, reward_ok=fmt == "torch", encoder_ok=True)
    out = Path(out)
    if fmt == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        out.with_name(out.name + ".config.json").write_text(
            json.dumps(model.cfg.model_dump(mode="json"), indent=1)
        )
        return out
    if fmt == "hf":
        from crucible.model.hf import to_hf

        to_hf(model).save_pretrained(out)
        tok = location(ckpt.read_state(path)["spec"]["data"]["shards"]) / "tokenizer.json"
        with contextlib.suppress(FileNotFoundError):
            (out / "tokenizer.json").write_bytes(tok.read_bytes())
        return out
    raise CrucibleError(f"export format {fmt!r} is not one of torch, hf")
