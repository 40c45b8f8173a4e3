"""The planner's memory-traffic count against the model itself: every aten operation of
crucible's GPT in forward and backward on the meta device, its tensor arguments and results
summed as bytes read and written; matmuls and attention are left out (they are compute-
bound), as are views (they move nothing)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crucible.cluster.plan.traffic import (
    ACTIVATION_BYTES,
    LOSS_BYTES_PER_LOGIT,
    activation_traffic_bytes,
    layer_elements_per_token,
)
from crucible.model.config import ModelConfig
from crucible.model.gpt import build_model
from crucible.model.parallelize import set_activation_checkpointing

MATMULS = {"mm", "addmm", "bmm"}
LOSS = {"_to_copy", "_log_softmax", "_log_softmax_backward_data"}
LOSS |= {"nll_loss_forward", "nll_loss_backward"}


class _Bytes(TorchDispatchMode):
    """Bytes of each non-matmul, non-view aten operation, by (phase, name)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.bytes: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[1]
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if aliases or name in MATMULS or "attention" in name or name == "_unsafe_view":
            return out
        if name.startswith("nll_loss"):
            # It indexes one log-probability per token and reads no more of them.
            log_probs = args[0] if name == "nll_loss_forward" else args[1]
            args = tuple(a for a in args if a is not log_probs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.bytes[self.phase, name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def _flash(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):  # type: ignore[no-untyped-def]
    # SDPA on the meta device would decompose into the math kernel; GPUs run flash.
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]


def _count(cfg: ModelConfig, batch: int, seq: int, checkpointing: bool) -> _Bytes:
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)
    set_activation_checkpointing(model, checkpointing)
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    counter = _Bytes()
    with counter:
        _, loss = model(tokens, tokens)
        counter.phase = "backward"
        assert loss is not None
        loss.backward()
    return counter


def _per_layer(cfg: ModelConfig, phase: str, checkpointing: bool = False) -> float:
    """Bytes per token of one layer in ``phase``: two layers' count less one layer's."""
    batch, seq = 2, 64
    two, one = (
        _count(cfg.model_copy(update={"n_layers": n}), batch, seq, checkpointing) for n in (2, 1)
    )
    diff = sum(v for (p, _), v in two.bytes.items() if p == phase)
    diff -= sum(v for (p, _), v in one.bytes.items() if p == phase)
    return diff / (batch * seq)


GPT = ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, max_seq_len=64)
SHAPES = {
    "gpt": GPT,
    "gpt-no-bias-ffn-3h": GPT.model_copy(update={"bias": False, "d_ff": 192}),
    "llama": GPT.model_copy(update={"mlp": "swiglu", "pos": "rotary", "bias": False, "d_ff": 176}),
    "swiglu-bias-gqa": GPT.model_copy(update={"mlp": "swiglu", "d_ff": 176, "n_kv_heads": 2}),
}


@pytest.fixture(autouse=True)
def _flash_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "scaled_dot_product_attention", _flash)


@pytest.mark.parametrize("name", list(SHAPES))
def test_layer_traffic_is_what_the_model_reads_and_writes(name):
    cfg = SHAPES[name]
    fwd, bwd = layer_elements_per_token(cfg)
    assert _per_layer(cfg, "forward") == pytest.approx(fwd * ACTIVATION_BYTES, rel=0.02)
    assert _per_layer(cfg, "backward") == pytest.approx(bwd * ACTIVATION_BYTES, rel=0.02)


def test_checkpointing_adds_the_recomputed_forward_to_the_backward():
    fwd, bwd = layer_elements_per_token(GPT)
    recomputed = fwd - 3 * GPT.d_model  # all but the last residual add
    counted = _per_layer(GPT, "backward", checkpointing=True)
    assert counted == pytest.approx((bwd + recomputed) * ACTIVATION_BYTES, rel=0.02)
    tokens = 1000
    on = activation_traffic_bytes(GPT, tokens, checkpointing=True)
    off = activation_traffic_bytes(GPT, tokens, checkpointing=False)
    assert on - off == GPT.n_layers * recomputed * ACTIVATION_BYTES * tokens


def test_loss_traffic_is_what_the_loss_reads_and_writes():
    batch, seq = 2, 64
    counter = _count(GPT, batch, seq, checkpointing=False)
    loss = sum(v for (_, n), v in counter.bytes.items() if n in LOSS)
    assert loss / (batch * seq) == pytest.approx(LOSS_BYTES_PER_LOGIT * GPT.vocab_size, rel=0.02)
