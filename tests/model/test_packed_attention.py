"""Packed examples (fine-tuning): with a document mask and positions restarting at each
example, every example's logits are those it has alone; the flex-attention mask gives the
dense mask's attention."""

from __future__ import annotations

import pytest
import torch

from crucible.model.config import ModelConfig
from crucible.model.gpt import build_model, document_mask, init_weights
from crucible.model.presets import PRESETS

LLAMA = {"pos": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2, "bias": False}


def _model(extra: dict | None = None) -> torch.nn.Module:
    cfg = ModelConfig.model_validate(PRESETS["tiny"].model_dump() | (extra or {}))
    return init_weights(build_model(cfg, device="cpu"), seed=3).eval()


@pytest.mark.parametrize("extra", [{}, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_packed_examples_equal_separate_forwards(extra: dict, flex: bool) -> None:
    model = _model(extra)
    model.flex_attention = flex
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 11]
    examples = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.cat(examples)[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed, _ = model(tokens, doc_ids=doc, positions=positions)
        start = 0
        for ex in examples:
            alone, _ = model(ex[None])
            got = packed[0, start : start + len(ex)]
            # float reordering only: the same sums over different block layouts
            torch.testing.assert_close(got, alone[0], rtol=1e-4, atol=1e-5)
            start += len(ex)


def test_flex_block_mask_equals_dense_mask() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 2, 2, -1, -1]])
    block = document_mask(doc, flex=True)
    dense = document_mask(doc, flex=False)
    assert not isinstance(block, torch.Tensor)
    x = torch.randn(2, 4, 10, 16)
    from crucible.model.gpt import flex_attention

    y_flex = flex_attention(x, x, x, block)
    y_dense = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=dense)
    # rows of -1 (padding) attend to padding only in both; compare where a document is
    torch.testing.assert_close(y_flex, y_dense, rtol=1e-5, atol=1e-5)


def test_positions_reject_a_cache() -> None:
    from crucible.model.kv_cache import KVCache

    model = _model()
    cache = KVCache(model.cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.zeros(1, 2), cache=cache)
