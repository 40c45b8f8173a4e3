"""The GPT module: causality, GQA, document masking, init, overfitting, meta construction."""

from __future__ import annotations

import math
import resource
from collections.abc import Callable

import pytest
import torch

from crucible.model.config import ModelConfig
from crucible.model.gpt import GPT, build_model, init_weights
from crucible.model.parallelize import set_activation_checkpointing
from crucible.model.presets import get_preset


@pytest.mark.parametrize("kind", ["gpt_cfg", "llama_cfg"])
def test_causality(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    cfg: ModelConfig = request.getfixturevalue(kind)
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, _ = model(tokens)
    for t in [0, 5, 14]:
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, cfg.vocab_size, (2, 15 - t))
        changed[:, t + 1] = (tokens[:, t + 1] + 1) % cfg.vocab_size
        out, _ = model(changed)
        assert torch.equal(out[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], logits[:, t + 1])


def test_gqa_with_all_kv_heads_equals_mha(
    llama_cfg: ModelConfig, make_model: Callable[..., GPT]
) -> None:
    mha_cfg = llama_cfg.model_copy(update={"n_kv_heads": None})
    gqa_cfg = llama_cfg.model_copy(update={"n_kv_heads": llama_cfg.n_heads})
    mha, gqa = make_model(mha_cfg, seed=1), make_model(gqa_cfg, seed=2)
    gqa.load_state_dict(mha.state_dict())
    tokens = torch.randint(0, llama_cfg.vocab_size, (2, 12))
    torch.testing.assert_close(gqa(tokens)[0], mha(tokens)[0], rtol=0, atol=0)


def test_gqa_shares_kv_heads_across_groups(
    llama_cfg: ModelConfig, make_model: Callable[..., GPT]
) -> None:
    # MQA (one K/V head) must equal MHA whose K/V heads are all copies of that one head.
    mqa_cfg = llama_cfg.model_copy(update={"n_kv_heads": 1})
    mha_cfg = llama_cfg.model_copy(update={"n_kv_heads": None})
    mqa, mha = make_model(mqa_cfg), make_model(mha_cfg)
    hd, h, d = llama_cfg.head_dim, llama_cfg.n_heads, llama_cfg.d_model
    sd = mha.state_dict()
    for key, w in mqa.state_dict().items():
        if key.endswith("attn.qkv.weight"):
            q, k, v = w.split([h * hd, hd, hd])
            sd[key] = torch.cat([q, k.repeat(h, 1), v.repeat(h, 1)])
            assert sd[key].shape == (3 * d, d)
        else:
            sd[key] = w
    mha.load_state_dict(sd)
    tokens = torch.randint(0, llama_cfg.vocab_size, (2, 12))
    torch.testing.assert_close(mqa(tokens)[0], mha(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt_cfg", "llama_cfg"])
def test_doc_ids_equal_separate_documents(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    cfg: ModelConfig = request.getfixturevalue(kind)
    model = make_model(cfg)
    a = torch.randint(0, cfg.vocab_size, (1, 7))
    b = torch.randint(0, cfg.vocab_size, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    out, _ = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :7], model(a)[0], rtol=1e-5, atol=1e-5)
    # The second document sees nothing of the first.
    other = torch.cat([torch.randint(0, cfg.vocab_size, (1, 7)), b], dim=1)
    torch.testing.assert_close(model(other, doc_ids=doc_ids)[0][:, 7:], out[:, 7:])
    # All-one-document ids give plain causal attention.
    torch.testing.assert_close(
        model(packed, doc_ids=torch.zeros_like(doc_ids))[0], model(packed)[0]
    )
    if cfg.pos == "learned":
        # Positions stay global: b at offset 7 differs from b at offset 0.
        assert not torch.allclose(out[:, 7:], model(b)[0], atol=1e-3)


def test_init_statistics(make_model: Callable[..., GPT]) -> None:
    cfg = get_preset("tiny").model_copy(update={"n_layers": 8, "d_model": 256, "n_heads": 4})
    model = make_model(cfg, seed=3)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(model.tok_emb.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert std(model.blocks[3].attn.proj.weight) == pytest.approx(scaled, rel=0.05)
    assert std(model.blocks[3].mlp.proj.weight) == pytest.approx(scaled, rel=0.05)
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(
        model.blocks[0].norm1.bias == 0
    )
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.lm_head.weight is model.tok_emb.weight
    again = make_model(cfg, seed=3)
    assert torch.equal(again.blocks[5].mlp.fc.weight, model.blocks[5].mlp.fc.weight)
    assert not torch.equal(make_model(cfg, seed=4).tok_emb.weight, model.tok_emb.weight)


def test_loss_is_mean_cross_entropy_and_ignores_minus_100(
    gpt_cfg: ModelConfig, make_model: Callable[..., GPT]
) -> None:
    model = make_model(gpt_cfg)
    tokens = torch.randint(0, gpt_cfg.vocab_size, (2, 10))
    targets = torch.randint(0, gpt_cfg.vocab_size, (2, 10))
    logits, loss = model(tokens, targets)
    logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, -logp.mean())
    targets[:, 5:] = -100
    _, partial = model(tokens, targets)
    torch.testing.assert_close(partial, -logp[:, :5].mean())
    assert model(tokens)[1] is None
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, gpt_cfg.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt_cfg", "llama_cfg"])
def test_tiny_model_overfits_one_batch(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    cfg: ModelConfig = request.getfixturevalue(kind)
    model = make_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(cfg.vocab_size), rel=0.1)
    assert loss.item() < 0.1


def test_dropout_only_in_training(gpt_cfg: ModelConfig, make_model: Callable[..., GPT]) -> None:
    model = make_model(gpt_cfg.model_copy(update={"dropout": 0.5}))
    tokens = torch.randint(0, gpt_cfg.vocab_size, (2, 8))
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.allclose(model(tokens)[0], model(tokens)[0])


def test_activation_checkpointing_same_gradients(
    llama_cfg: ModelConfig, make_model: Callable[..., GPT]
) -> None:
    model = make_model(llama_cfg).train()
    tokens = torch.randint(0, llama_cfg.vocab_size, (2, 12))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(tokens, tokens)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    names = list(model.state_dict())
    set_activation_checkpointing(model, True)
    assert list(model.state_dict()) == names  # names unchanged: checkpoints stay compatible
    ckpt = grads()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g)
    set_activation_checkpointing(model, False)
    assert "forward" not in model.blocks[0].__dict__


def test_gpt3_175b_builds_on_meta_without_host_memory() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(get_preset("gpt3-175b"), device="meta")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 174e9
    assert grown_kib < 512 * 1024  # well under 1 GiB of host memory (weights would be 350 GB)


def test_build_model_dtype_and_device() -> None:
    cfg = get_preset("tiny")
    model = build_model(cfg, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    init_weights(model, seed=0)
    logits, loss = model(torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
