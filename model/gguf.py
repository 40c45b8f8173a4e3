"""GGUF, the file llama.cpp runs: crucible's :class:`GPT` to a ``.gguf`` file, and back.

A GPT-2-style config is written as llama.cpp's ``gpt2`` architecture (fused ``attn_qkv``,
learned ``position_embd``); a LLaMA-style one as ``llama`` (``attn_q``/``attn_k``/``attn_v``).
Names, metadata and tensor types follow what llama.cpp's ``convert_hf_to_gguf.py`` writes
for the Hugging Face model of the same shape (:mod:`crucible.model.hf`):

- crucible's rotary pairs the two halves of a head (Hugging Face's ``rotate_half``);
  llama.cpp's ``llama`` pairs neighbours, so Q and K rows are permuted on the way out (the
  converter's ``LlamaModel.permute``) and back on the way in.
- 1-D tensors, norms, biases and the position table stay f32. Other weights take the
  ``quant`` type, or f16 when their rows are not whole blocks of it (32 values for the
  ``q*_0``/``q*_1`` types); :func:`write_gguf` reports which.
- A tied output projection is not written: llama.cpp reuses ``token_embd``.
- The tokenizer is the run's byte-level BPE as ``tokenizer.ggml.model = gpt2`` with the GPT-2
  pre-tokenizer; ids the tokenizer lacks up to the model's vocabulary are ``[PAD<i>]``.

The ``gguf`` package (``pip install crucible[export]``) quantises to q8_0, q4_0, q4_1, q5_0
and q5_1; it only reads k-quants (q4_k_m, ...), which llama.cpp's ``llama-quantize`` makes
from an f16 file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crucible.errors import CrucibleError
from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model
from crucible.model.hf import hf_family

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# --quant value -> ggml tensor type; every one of them the gguf package can write.
QUANTS = {
    "f32": "F32",
    "f16": "F16",
    "q8_0": "Q8_0",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
}
# llama.cpp types the gguf package cannot write (it only dequantises them).
LLAMA_QUANTIZE_ONLY = (
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s",
    "iq3_m", "iq4_nl", "iq4_xs",
)  # fmt: skip

# crucible parameter (without .weight/.bias) -> llama.cpp tensor (gguf.MODEL_TENSOR member).
_TOP = {
    "tok_emb": "TOKEN_EMBD",
    "pos_emb": "POS_EMBD",
    "norm_f": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
}
_BLOCK = {
    "norm1": "ATTN_NORM",
    "attn.qkv": "ATTN_QKV",  # llama: split into ATTN_Q, ATTN_K, ATTN_V
    "attn.proj": "ATTN_OUT",
    "norm2": "FFN_NORM",
    "mlp.fc": "FFN_UP",
    "mlp.gate": "FFN_GATE",
    "mlp.up": "FFN_UP",
    "mlp.proj": "FFN_DOWN",
}


@dataclass(frozen=True)
class WrittenTensor:
    """One tensor of a written file: llama.cpp name, shape (PyTorch order), ggml type name."""

    name: str
    shape: tuple[int, ...]
    type: str
    fallback: bool  # f16 instead of the requested type: rows are not whole blocks


def check_quant(quant: str) -> None:
    """Raise a one-line :class:`CrucibleError` for a ``--quant`` this module cannot write, or
    when the ``gguf`` package is not installed.

    Args:
        quant: e.g. ``q8_0``.
    """
    if quant in QUANTS:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise CrucibleError(
                "GGUF export needs the gguf package: pip install 'crucible[export]'"
            ) from None
        return
    if quant.lower() in LLAMA_QUANTIZE_ONLY:
        raise CrucibleError(
            f"--quant {quant}: the gguf Python package cannot write k-quants or i-quants; "
            f"export --quant f16, then run llama.cpp's `llama-quantize OUT-f16.gguf "
            f"OUT-{quant.lower()}.gguf {quant.upper()}`"
        )
    raise CrucibleError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for ``cfg``: ``gpt2`` or ``llama`` (as for Hugging Face).

    Args:
        cfg: the model shape.
    """
    try:
        return hf_family(cfg)
    except CrucibleError as e:
        raise CrucibleError(f"no llama.cpp architecture for this model: {e}") from None


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q or K projection rows from split-halves rotary (crucible, Hugging Face) to llama.cpp's
    interleaved pairs, per head: rows (0..d/2, d/2..d) become (0, d/2, 1, d/2+1, ...).

    Args:
        w: weight [n_heads·head_dim, d_model] or bias [n_heads·head_dim].
        n_heads: heads in ``w`` (K/V heads for K).
    """
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary`."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensor_name(member: str, bid: int | None, suffix: str) -> str:
    import gguf

    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]
    return (name.format(bid=bid) if bid is not None else name) + "." + suffix


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under llama.cpp's names, in llama.cpp's layout (fp32, CPU).

    Args:
        model: a materialised :class:`GPT`.
    """
    cfg = model.cfg
    llama = gguf_arch(cfg) == "llama"
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = value.detach().to("cpu", torch.float32)
        path, _, suffix = key.rpartition(".")
        if not path.startswith("blocks."):
            out[_tensor_name(_TOP[path], None, suffix)] = t
            continue
        _, bid_text, part = path.split(".", 2)
        bid = int(bid_text)
        if llama and part == "attn.qkv":
            hd = cfg.head_dim
            q, k, v = t.split([cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
            out[_tensor_name("ATTN_Q", bid, suffix)] = permute_rotary(q, cfg.n_heads)
            out[_tensor_name("ATTN_K", bid, suffix)] = permute_rotary(k, cfg.kv_heads)
            out[_tensor_name("ATTN_V", bid, suffix)] = v
        else:
            out[_tensor_name(_BLOCK[part], bid, suffix)] = t
    return out


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> tuple[str, bool]:
    """The ggml type a tensor is written in, and whether it fell back to f16.

    Args:
        name: llama.cpp tensor name.
        shape: its shape, PyTorch order (rows last).
        quant: the requested ``--quant``.
    """
    import gguf

    if len(shape) <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return "F32", False
    if name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + "."):
        return "F32", False
    want = QUANTS[quant]
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]]
    if shape[-1] % block:
        return "F16", True
    return want, False


def _byte_level_vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a byte-level BPE tokenizer, for ``vocab_size`` ids."""
    import gguf

    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    # llama.cpp's gpt2 pre-tokenizer: GPT-2's regex, bytes to unicode, no prefix space.
    gpt2_pre = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if (
        spec["model"]["type"] != "BPE"
        or not gpt2_pre
        or pre.get("add_prefix_space")
        or spec.get("normalizer")
    ):
        raise CrucibleError(
            "GGUF export needs the run's tokenizer to be a byte-level BPE with GPT-2's "
            f"pre-tokenizer and no normalizer (model {spec['model']['type']}, pre-tokenizer "
            f"{pre.get('type')}, normalizer {(spec.get('normalizer') or {}).get('type')})"
        )
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise CrucibleError(
            f"the tokenizer has id {max(by_id)}, past the model's vocab_size {vocab_size}"
        )
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


def write_gguf(
    model: GPT, out: Path, quant: str, tokenizer: Tokenizer, eos_id: int, name: str = "crucible"
) -> list[WrittenTensor]:
    """Write ``model`` and its tokenizer as a GGUF file llama.cpp loads; return its tensors.

    The file is written beside ``out`` and renamed into place.

    Args:
        model: a materialised :class:`GPT` (GPT-2- or LLaMA-style config).
        out: the ``.gguf`` file.
        quant: one of :data:`QUANTS`.
        tokenizer: the tokenizer the model was trained with (byte-level BPE).
        eos_id: its end-of-text id (also BOS, as GPT-2's ``<|endoftext|>``).
        name: ``general.name``.
    """
    import gguf

    check_quant(quant)
    cfg = model.cfg
    arch = gguf_arch(cfg)
    tokens, types, merges = _byte_level_vocab(tokenizer, cfg.vocab_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    file_type = "ALL_F32" if quant == "f32" else f"MOSTLY_{QUANTS[quant]}"
    w.add_file_type(gguf.LlamaFileType[file_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)

    w.add_tokenizer_model("gpt2")
    # llama.cpp's name of GPT-2's pre-tokenizer (llama-vocab.cpp; convert_hf_to_gguf.py
    # writes it): "gpt2" is an unknown pre-tokenizer there and the file does not load.
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eos_id)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(False)  # crucible trains without a BOS before each document

    written = []
    for tname, t in gguf_tensors(model).items():
        shape = tuple(t.shape)
        qtype, fallback = tensor_type(tname, shape, quant)
        gtype = gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(t.numpy(), gtype)
        w.add_tensor(tname, data, raw_dtype=gtype)
        written.append(WrittenTensor(tname, shape, qtype, fallback))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    value = f.contents()
    # GGUF floats are float32: 1e-5 comes back as 9.99999975e-06 unless printed shortest.
    return float(str(np.float32(value))) if isinstance(value, float) else value


def read_gguf(path: Path) -> GPT:
    """A :class:`GPT` from a file :func:`write_gguf` wrote, read with the ``gguf`` package's
    reader: quantised weights dequantised, Q/K rows permuted back, Q/K/V fused again.

    Args:
        path: the ``.gguf`` file.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gpt2"):
        raise CrucibleError(f"{path}: architecture {arch!r} is not llama or gpt2")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))
    n_heads = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_heads)
    llama = arch == "llama"
    eps_key = "layer_norm_rms_epsilon" if llama else "layer_norm_epsilon"
    cfg = ModelConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        n_layers=_field(reader, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        d_model=_field(reader, f"{arch}.embedding_length"),
        d_ff=_field(reader, f"{arch}.feed_forward_length"),
        max_seq_len=_field(reader, f"{arch}.context_length"),
        pos="rotary" if llama else "learned",
        norm="rmsnorm" if llama else "layernorm",
        mlp="swiglu" if llama else "gelu",
        bias=not llama or "blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
        rope_theta=_field(reader, f"{arch}.rope.freq_base", 10000.0),
        norm_eps=_field(reader, f"{arch}.attention.{eps_key}"),
    )
    # llama.cpp name -> crucible name; FFN_UP is mlp.up in llama and mlp.fc in gpt2.
    unused = ("mlp.fc", "attn.qkv") if llama else ("mlp.gate", "mlp.up")
    names = {
        _tensor_name(m, None, s): f"{p}.{s}" for p, m in _TOP.items() for s in ("weight", "bias")
    }
    sd: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            names |= {
                _tensor_name(member, i, s): f"blocks.{i}.{part}.{s}"
                for part, member in _BLOCK.items()
                if part not in unused
            }
            if llama and _tensor_name("ATTN_Q", i, s) in tensors:
                q, k, v = (tensors.pop(_tensor_name(f"ATTN_{p}", i, s)) for p in "QKV")
                q, k = unpermute_rotary(q, cfg.n_heads), unpermute_rotary(k, cfg.kv_heads)
                sd[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([q, k, v])
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CrucibleError(f"{path}: tensors crucible's {arch} does not have: {unknown[:5]}")
    sd |= {names[k]: v for k, v in tensors.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    model = build_model(cfg, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()
