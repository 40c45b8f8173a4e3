"""Converters between crucible's models and Hugging Face ``transformers`` models.

GPT-2/3-style configs (learned positions, LayerNorm, tanh-GELU, biases, no GQA) map to
``GPT2LMHeadModel``; LLaMA-style configs (rotary, RMSNorm, SwiGLU, optional GQA) map to
``LlamaForCausalLM``; ``arch: bert`` maps to ``BertForPreTraining`` (:mod:`.hf_bert`). crucible's rotary uses Hugging Face's split-halves layout
(``rotate_half``), so Llama weights copy over without permutation; GPT-2's ``Conv1D``
weights are stored transposed ([in, out]) and are transposed on the way.

The state-dict functions work on plain dicts (e.g. streamed from safetensors); the model
functions build the target model and load it. ``transformers`` is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from crucible.errors import CrucibleError
from crucible.model import hf_bert
from crucible.model.bert import Bert
from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Family = Literal["gpt2", "llama", "bert"]
StateDict = dict[str, torch.Tensor]


def hf_family(cfg: ModelConfig) -> Family:
    """Which Hugging Face architecture represents ``cfg`` exactly.

    Args:
        cfg: the model shape.
    """
    if cfg.arch == "bert":
        return "bert"
    gpt2 = (cfg.pos, cfg.norm, cfg.mlp, cfg.bias) == ("learned", "layernorm", "gelu", True)
    if gpt2 and cfg.kv_heads == cfg.n_heads:
        return "gpt2"
    if (cfg.pos, cfg.norm, cfg.mlp) == ("rotary", "rmsnorm", "swiglu"):
        return "llama"
    raise CrucibleError(
        f"no Hugging Face architecture matches pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp}, "
        f"bias={cfg.bias}, n_kv_heads={cfg.n_kv_heads}; use a GPT-2-style (learned, layernorm, "
        "gelu, bias, no GQA) or LLaMA-style (rotary, rmsnorm, swiglu) config"
    )


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The ``GPT2Config`` or ``LlamaConfig`` with the same shape as ``cfg``.

    Args:
        cfg: the model shape.
    """
    from transformers import GPT2Config, LlamaConfig

    if cfg.arch == "bert":
        return hf_bert.hf_bert_config(cfg)
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=None,  # token ids belong to the tokenizer, not the model shape
        eos_token_id=None,
    )
    if hf_family(cfg) == "gpt2":
        return GPT2Config(
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,  # None: 4·d_model in both
            activation_function="gelu_new",  # tanh approximation, as crucible's GELU
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            **common,
        )
    return LlamaConfig(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout,
        hidden_act="silu",
        **common,
    )


def config_from_hf(hf: PretrainedConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a ``GPT2Config`` or ``LlamaConfig``.

    Args:
        hf: a Hugging Face config (``model.config``).
    """
    kind = getattr(hf, "model_type", None)
    if kind == "bert":
        return hf_bert.config_from_hf_bert(hf)
    if kind == "gpt2":
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CrucibleError(f"GPT-2 activation {hf.activation_function!r} is not tanh-GELU")
        if hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
            raise CrucibleError("GPT-2 configs with non-standard attention scaling are unsupported")
        return ModelConfig(
            vocab_size=hf.vocab_size,
            n_layers=hf.n_layer,
            n_heads=hf.n_head,
            d_model=hf.n_embd,
            d_ff=hf.n_inner,
            max_seq_len=hf.n_positions,
            pos="learned",
            norm="layernorm",
            mlp="gelu",
            bias=True,
            tie_embeddings=hf.tie_word_embeddings,
            dropout=hf.resid_pdrop,
            norm_eps=hf.layer_norm_epsilon,
            init_std=hf.initializer_range,
        )
    if kind == "llama":
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise CrucibleError(
                f"Llama rope_type {rope['rope_type']!r} is unsupported (default only)"
            )
        if hf.hidden_act != "silu" or hf.attention_bias != hf.mlp_bias:
            raise CrucibleError("Llama configs need hidden_act silu and equal attention/mlp bias")
        if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads):
            raise CrucibleError("Llama head_dim must equal hidden_size / num_attention_heads")
        return ModelConfig(
            vocab_size=hf.vocab_size,
            n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads,
            n_kv_heads=(
                None if hf.num_key_value_heads == hf.num_attention_heads else hf.num_key_value_heads
            ),
            d_model=hf.hidden_size,
            d_ff=hf.intermediate_size,
            max_seq_len=hf.max_position_embeddings,
            pos="rotary",
            norm="rmsnorm",
            mlp="swiglu",
            bias=hf.attention_bias,
            tie_embeddings=hf.tie_word_embeddings,
            dropout=hf.attention_dropout,
            rope_theta=rope.get("rope_theta", 10000.0),
            norm_eps=hf.rms_norm_eps,
            init_std=hf.initializer_range,
        )
    raise CrucibleError(f"unsupported Hugging Face model_type {kind!r}; use gpt2, llama or bert")


# crucible suffix -> Hugging Face suffix, per block; "T" marks GPT-2 Conv1D (transposed).
_GPT2_BLOCK = {
    "norm1.weight": "ln_1.weight",
    "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight T",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight T",
    "attn.proj.bias": "attn.c_proj.bias",
    "norm2.weight": "ln_2.weight",
    "norm2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight T",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight T",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
_LLAMA_BLOCK = {
    "norm1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "attn.proj.bias": "self_attn.o_proj.bias",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "mlp.proj.bias": "mlp.down_proj.bias",
}


def _key_map(cfg: ModelConfig) -> dict[str, str]:
    """crucible name -> Hugging Face name (with " T" if transposed), for all but fused qkv."""
    if hf_family(cfg) == "gpt2":
        top = {
            "tok_emb.weight": "transformer.wte.weight",
            "pos_emb.weight": "transformer.wpe.weight",
            "norm_f.weight": "transformer.ln_f.weight",
            "norm_f.bias": "transformer.ln_f.bias",
        }
        prefix, block = "transformer.h", _GPT2_BLOCK
    else:
        top = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
        prefix, block = "model.layers", _LLAMA_BLOCK
    top["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        top |= {f"blocks.{i}.{ours}": f"{prefix}.{i}.{theirs}" for ours, theirs in block.items()}
    return top


def _qkv_split(cfg: ModelConfig) -> list[int]:
    hd = cfg.head_dim
    return [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]


def state_dict_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Rename (and transpose or split where needed) a crucible state dict for Hugging Face.

    Args:
        sd: ``GPT.state_dict()`` (a tied model lists ``lm_head.weight`` too).
        cfg: the model shape.
    """
    if cfg.arch == "bert":
        return hf_bert.bert_state_dict_to_hf(sd, cfg)
    out: StateDict = {}
    llama = hf_family(cfg) == "llama"
    for ours, theirs in _key_map(cfg).items():
        if ours in sd:
            name, _, flag = theirs.partition(" ")
            out[name] = sd[ours].t().contiguous() if flag == "T" else sd[ours]
    if llama:
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                fused = sd.get(f"blocks.{i}.attn.qkv.{kind}")
                if fused is not None:
                    q, k, v = fused.split(_qkv_split(cfg))
                    base = f"model.layers.{i}.self_attn"
                    out |= {f"{base}.q_proj.{kind}": q, f"{base}.k_proj.{kind}": k}
                    out[f"{base}.v_proj.{kind}"] = v
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out[_key_map(cfg)["tok_emb.weight"]]
    return out


def state_dict_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Rename (and transpose or fuse) a Hugging Face state dict for crucible's :class:`GPT`.

    Args:
        sd: ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` state dict (buffers are ignored).
        cfg: the model shape (e.g. from :func:`config_from_hf`).
    """
    if cfg.arch == "bert":
        return hf_bert.bert_state_dict_from_hf(sd, cfg)
    out: StateDict = {}
    for ours, theirs in _key_map(cfg).items():
        name, _, flag = theirs.partition(" ")
        if name in sd:
            out[ours] = sd[name].t().contiguous() if flag == "T" else sd[name]
    if hf_family(cfg) == "llama":
        for i in range(cfg.n_layers):
            base = f"model.layers.{i}.self_attn"
            for kind in ("weight", "bias"):
                parts = [sd.get(f"{base}.{p}_proj.{kind}") for p in "qkv"]
                if all(p is not None for p in parts):
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)  # type: ignore[arg-type]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def to_hf(model: GPT) -> PreTrainedModel:
    """A ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` holding a copy of ``model``'s weights.

    Args:
        model: a materialised (not meta, not ZeRO-3-partitioned) :class:`GPT`.
    """
    from transformers import BertForPreTraining, GPT2LMHeadModel, LlamaForCausalLM

    cfg = model.cfg
    classes = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "bert": BertForPreTraining}
    cls: Any = classes[hf_family(cfg)]
    first = next(model.parameters())
    hf = cls(hf_config(cfg)).to(dtype=first.dtype)
    sd = {k: v.detach().clone() for k, v in state_dict_to_hf(model.state_dict(), cfg).items()}
    hf.load_state_dict(sd, strict=True)
    return hf.to(first.device).eval()


def from_hf(hf: PreTrainedModel) -> GPT:
    """A :class:`GPT` holding a copy of a ``GPT2LMHeadModel`` / ``LlamaForCausalLM``'s weights.

    Args:
        hf: the Hugging Face model (e.g. from ``from_pretrained``).
    """
    cfg = config_from_hf(hf.config)
    sd = state_dict_from_hf(hf.state_dict(), cfg)
    model = build_model(cfg, device="meta")
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True, assign=True)
    if isinstance(model, Bert):  # assign=True loads each name separately; share again
        model.tie_weights()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()
