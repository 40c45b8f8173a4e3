"""HBM bytes one GPU moves per optimizer step outside the matmuls.

Matmuls and flash attention are compute-bound: their time is in the FLOP term. Everything
else reads and writes whole tensors for a few operations per element (norms, the MLP's
activation, residual adds, bias gradients, the loss over the vocabulary, the optimizer and
ZeRO's copies), so its time is bytes over HBM bandwidth, and its share of the step grows as
the model narrows: these bytes scale with L·h per token, the FLOPs with L·h².

Counted as the reads plus writes of each eager kernel of crucible's GPT (bf16 activations,
2 bytes an element), per token and layer, with h the width, f the MLP's hidden width and
w the q/k/v projection's output width:

* forward: two norms (read x, write y: 2·2h), two residual adds (3h each), the activation
  (GELU: read, write, 2f; SwiGLU: silu and the product, 5f), rotary, GQA's repeated K/V;
* backward: two norm gradients (read x and dy, write dx: 2·3h), two gradient sums where the
  residual branches meet (2·3h), the q/k/v gradients concatenated (2w), the activation's
  gradient (GELU 3f; SwiGLU 9f + 3h), bias gradients (one read of every projection's
  output gradient), rotary's and GQA's;
* with activation checkpointing, the forward once more but its last residual add.

Norms count as one fused kernel each (LayerNorm always, RMSNorm on CUDA). Per token, the
loss over the vocabulary V: the fp32 copy of the logits (6 bytes/entry), log-softmax (8),
the likelihood's gradient (4, written dense), log-softmax's gradient (12) and the cast
back (6). Per micro-batch, ZeRO-3's gathers copy the bf16 weights before forward and
again before backward (4 bytes/param each), and every stage copies the bf16 gradients into
its reduce buckets (4). Per step, the optimizer over this GPU's shard (unless offloaded):
Adam reads the fp32 weights, gradients, m and v and writes weights, m and v (28 bytes/param),
the gradient norm reads the gradients (4), and the bf16 weights are rewritten from the fp32
ones (6). ``tests/cluster/test_traffic.py`` checks the per-layer and loss counts against
the bytes of every aten operation of the model's forward and backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crucible.model.accounting import num_params

if TYPE_CHECKING:
    from crucible.model.config import ModelConfig
    from crucible.model.spec import ParallelSpec

ACTIVATION_BYTES = 2  # bf16
LOSS_BYTES_PER_LOGIT = 6 + 8 + 4 + 12 + 6
GATHER_BYTES_PER_PARAM = 4  # ZeRO-3, per gather: read the shard, write the gathered weight
GRAD_BUCKET_BYTES_PER_PARAM = 4  # per micro-batch
OPTIMIZER_BYTES_PER_PARAM = 28 + 4 + 6  # Adam, gradient norm, fp32 → bf16 weights


def layer_elements_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """(forward, backward) elements one layer's non-matmul kernels read and write per token.

    Args:
        cfg: the model shape.
    """
    h, f = cfg.d_model, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    w = h + 2 * kv  # the q/k/v projection's output
    swiglu = cfg.mlp == "swiglu"
    fwd = 2 * 2 * h + 2 * 3 * h  # norms, residual adds
    bwd = 2 * 3 * h + 2 * 3 * h + 2 * w  # norms, gradient sums, q/k/v gradients concatenated
    if swiglu:  # silu and the product; their gradients, and gate's and up's inputs' summed
        fwd, bwd = fwd + 5 * f, bwd + 9 * f + 3 * h
    else:  # GELU
        fwd, bwd = fwd + 2 * f, bwd + 3 * f
    if cfg.bias:  # bias gradients read every projection's output gradient once
        bwd += w + 2 * h + (2 * f if swiglu else f)
    if cfg.pos == "rotary":  # q and k rotated: about ten passes over them, twelve back
        fwd, bwd = fwd + 10 * (h + kv), bwd + 12 * (h + kv)
    if kv < h:  # GQA: keys and values repeated to every head, their gradients summed back
        fwd, bwd = fwd + 2 * 2 * h, bwd + 2 * h + 6 * kv
    return fwd, bwd


def activation_traffic_bytes(cfg: ModelConfig, tokens: int, checkpointing: bool) -> float:
    """Bytes of the layers' and the loss's non-matmul kernels for ``tokens`` tokens.

    Args:
        cfg: the model shape.
        tokens: tokens this GPU processes (micro-batch × sequence × accumulation).
        checkpointing: activation recomputation (every layer's forward runs twice).
    """
    fwd, bwd = layer_elements_per_token(cfg)
    # Recomputation stops once backward has what it needs: before the last residual add.
    layer = fwd + bwd + (fwd - 3 * cfg.d_model if checkpointing else 0)
    per_token = cfg.n_layers * layer * ACTIVATION_BYTES + LOSS_BYTES_PER_LOGIT * cfg.vocab_size
    return float(tokens * per_token)


def step_traffic_bytes(
    cfg: ModelConfig,
    parallel: ParallelSpec,
    *,
    num_gpus: int,
    tokens: int,
    grad_accum_steps: int,
    checkpointing: bool,
) -> float:
    """HBM bytes one GPU moves per optimizer step outside matmuls and attention.

    Args:
        cfg: the model shape.
        parallel: ZeRO stage and offload.
        num_gpus: data-parallel ranks (the optimizer shard is 1/num_gpus of the model at
            ZeRO-1 and above).
        tokens: tokens this GPU processes per step.
        grad_accum_steps: micro-batches per step.
        checkpointing: activation recomputation.
    """
    psi = num_params(cfg)
    per_micro = GRAD_BUCKET_BYTES_PER_PARAM * psi
    if parallel.zero_stage == 3:
        per_micro += 2 * GATHER_BYTES_PER_PARAM * psi
    shard = psi / num_gpus if parallel.zero_stage >= 1 else psi
    optimizer = 0.0 if parallel.offload_optimizer != "none" else OPTIMIZER_BYTES_PER_PARAM * shard
    return (
        activation_traffic_bytes(cfg, tokens, checkpointing)
        + grad_accum_steps * per_micro
        + optimizer
    )
