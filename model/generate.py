"""Decoding: greedy and sampled next tokens, and batched generation with a KV cache.

Prompts of different lengths are left-padded, so every row's newest token sits in the same
slot of the :class:`~crucible.model.kv_cache.KVCache`; a row's padding is never attended to
and does not count as positions, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from crucible.model.gpt import GPT
from crucible.model.kv_cache import KVCache

# Prompts are fed in chunks: a full forward's logits of a long batch ([B, T, vocab]) would be
# the largest tensor of decoding, and only the last position's are used.
PREFILL_CHUNK = 512


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [B] of each row from its logits [B, vocab].

    Temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature,
    cut to the ``top_k`` largest and then to the smallest set whose probability reaches
    ``top_p`` (nucleus), in Hugging Face's order, and one token is drawn.

    Args:
        logits: next-token logits, [B, vocab].
        temperature: 0 for greedy, else the softmax temperature.
        top_k: keep only the k most likely tokens (None: all).
        top_p: keep the most likely tokens whose probabilities sum to at least this.
        generator: random source of the draw (seed it for reproducible samples).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    """Raise ValueError for settings :func:`sample_next` cannot honour."""
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_tokens: Collection[int] = (),
    generator: torch.Generator | None = None,
    lockstep: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens, all rows in one batch.

    Prompts may differ in length (they are left-padded; each row decodes as it would
    alone). A row ends at its first stop token, which ends its output, or after
    ``max_new_tokens``; decoding stops when every row has ended. The model runs in eval
    mode and is returned to its previous mode.

    Args:
        model: a materialised :class:`GPT`.
        prompts: token ids of each prompt; none may be empty.
        max_new_tokens: most tokens generated per row; prompt plus these must fit the context.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample from the k most likely tokens only (None: all).
        top_p: sample from the smallest set of tokens whose probability reaches this.
        stop_tokens: ids that end a row (e.g. the tokenizer's EOS).
        generator: random source of sampling (seed it for reproducible samples).
        lockstep: decode all ``max_new_tokens`` steps even after every row has stopped, so
            that the number of forward passes depends on the shapes alone (every rank of a
            ZeRO-3-sharded model must run the same forwards).

    Returns:
        The new tokens of each row, in prompt order.
    """
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's context of {cfg.max_seq_len}"
        )
    weight = next(model.parameters())
    device = weight.device
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)  # the pad id is never seen
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    tokens = tokens.to(device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    cache = KVCache(cfg, len(prompts), longest + max_new_tokens, pad, device, weight.dtype)
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        for s in range(0, longest, PREFILL_CHUNK):
            logits = model(tokens[:, s : s + PREFILL_CHUNK], cache=cache)[0][:, -1]
        new: list[torch.Tensor] = []
        ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            new.append(nxt)
            ended |= torch.isin(nxt, stop)
            if step + 1 == max_new_tokens or (not lockstep and bool(ended.all())):
                break
            logits = model(nxt[:, None], cache=cache)[0][:, -1]
    finally:
        model.train(was_training)

    out = []
    stops = set(stop_tokens)
    for row in torch.stack(new, dim=1).tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out
