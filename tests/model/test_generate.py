"""Decoding (model/generate.py): the KV cache gives a full forward's logits, greedy tokens
equal Hugging Face's ``generate``, sampling is seeded, stop tokens end rows, and a batch of
different-length prompts decodes as each prompt alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from crucible.model.config import ModelConfig
from crucible.model.generate import generate, sample_next
from crucible.model.gpt import GPT
from crucible.model.kv_cache import KVCache

KINDS = ["gpt_cfg", "llama_cfg"]  # learned positions + MHA; rotary + GQA (4 q, 2 kv heads)
# fp32 logits up to about 5 in size; cached and full forwards sum in different orders
# (worst seen over 20 seeds of these models: 5.6e-6).
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Models this small gain nothing from intra-op threads, and lose much on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]) -> GPT:
    """A random model whose logits are far from ties: larger init, perturbed norms/biases."""
    cfg: ModelConfig = request.getfixturevalue(kind)
    model = make_model(cfg.model_copy(update={"init_std": 0.2}), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _prompts(vocab: int, lengths: tuple[int, ...] = (3, 8, 5)) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_full_forward(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    model = _model(kind, request, make_model)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = KVCache(cfg, 3, 20)
        assert cache.layers[0].keys.shape == (3, cfg.kv_heads, 20, cfg.head_dim)  # GQA-wide
        steps = torch.cat([model(tokens[:, t : t + 1], cache=cache)[0] for t in range(20)], 1)
        # A prompt in one forward, then single steps.
        cache = KVCache(cfg, 3, 20)
        chunked = [model(tokens[:, :7], cache=cache)[0]]
        chunked += [model(tokens[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
        # Row 1 left-padded by 6 slots: its positions start at 0 after the padding.
        padded = torch.cat([torch.full((3, 6), 5), tokens[:, :14]], dim=1)
        cache = KVCache(cfg, 3, 20, pad=torch.tensor([0, 6, 0]))
        left = torch.cat([model(padded[:, t : t + 1], cache=cache)[0] for t in range(20)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.cat(chunked, 1), full, rtol=0, atol=ATOL)
    torch.testing.assert_close(left[1, 6:], full[1, :14], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="exceed the cache's 20 slots"):
        model(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_transformers_generate(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    pytest.importorskip("transformers")
    from crucible.model.hf import to_hf

    model = _model(kind, request, make_model)
    hf = to_hf(model)
    prompts = _prompts(model.cfg.vocab_size)
    ours = generate(model, prompts, max_new_tokens=12)
    assert len({t for row in ours for t in row}) > 6  # not a degenerate repetition
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :], attention[i, longest - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=attention, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert out[:, longest:].tolist() == ours


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_different_lengths_equals_each_alone(
    kind: str,
    request: pytest.FixtureRequest,
    make_model: Callable[..., GPT],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model(kind, request, make_model)
    prompts = _prompts(model.cfg.vocab_size, (1, 9, 4, 6))
    batched = generate(model, prompts, max_new_tokens=10)
    assert batched == [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    monkeypatch.setattr("crucible.model.generate.PREFILL_CHUNK", 4)  # prompts in 3 forwards
    assert generate(model, prompts, max_new_tokens=10) == batched


def test_sampling_is_reproducible_with_a_seed(
    llama_cfg: ModelConfig, make_model: Callable[..., GPT]
) -> None:
    model = make_model(llama_cfg, seed=1)
    prompts = _prompts(llama_cfg.vocab_size)

    def sample(seed: int, **kw: float) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 12, temperature=1.0, generator=gen, **kw)  # type: ignore[arg-type]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_p=0.9) == sample(0, top_p=0.9)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_1_and_tiny_top_p_equal_greedy(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    model = _model(kind, request, make_model)
    prompts = _prompts(model.cfg.vocab_size)
    greedy = generate(model, prompts, 12)
    gen = torch.Generator().manual_seed(0)
    assert generate(model, prompts, 12, temperature=1.5, top_k=1, generator=gen) == greedy
    assert generate(model, prompts, 12, temperature=1.5, top_p=1e-6, generator=gen) == greedy


def test_top_k_and_top_p_keep_the_likeliest_tokens() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)

    def drawn(**kw: float) -> torch.Tensor:
        return torch.bincount(sample_next(logits, 1.0, generator=gen, **kw), minlength=4)  # type: ignore[arg-type]

    assert drawn(top_k=3)[3] == 0 and drawn(top_k=3)[2] > 0
    # top_p 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it; renormalised 0.625 / 0.375.
    counts = drawn(top_p=0.7)
    assert counts[2:].sum() == 0
    assert counts[0] / 4000 == pytest.approx(0.625, abs=0.03)
    assert drawn(top_p=1.0)[3] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_stop_tokens_end_a_row(
    kind: str, request: pytest.FixtureRequest, make_model: Callable[..., GPT]
) -> None:
    model = _model(kind, request, make_model)
    prompts = _prompts(model.cfg.vocab_size)
    free = generate(model, prompts, 12)
    stop = free[0][3]
    cut = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert cut[0][-1] == stop and len(cut[0]) <= 4
    assert generate(model, prompts, 12, stop_tokens={stop}) == cut
    # Once every row has stopped, no further step runs.
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, prompts[:1], 12, stop_tokens={stop})
    finally:
        hook.remove()
    assert out == cut[:1] and len(calls) == len(cut[0])  # the prompt, then one step per token
    # In lockstep (every rank of a sharded model) all steps run; the output is the same.
    calls.clear()
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, prompts[:1], 12, stop_tokens={stop}, lockstep=True)
    finally:
        hook.remove()
    assert out == cut[:1] and len(calls) == 12


def test_bad_arguments_are_rejected(gpt_cfg: ModelConfig, make_model: Callable[..., GPT]) -> None:
    model = make_model(gpt_cfg)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 24"):
        generate(model, [[1] * 20], 5)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [[1]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="doc_ids or positions and a KV cache"):
        model(
            torch.ones(1, 2, dtype=torch.long),
            doc_ids=torch.zeros(1, 2),
            cache=KVCache(gpt_cfg, 1, 4),
        )
    assert not model.training and generate(model.train(), [[1]], 2) and model.training
