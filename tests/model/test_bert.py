"""BERT: the encoder, its pre-training loss, and conversion to and from Hugging Face's
``BertForPreTraining`` (equal logits and losses both ways)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from crucible.model.bert import Bert
from crucible.model.config import ModelConfig
from crucible.model.gpt import build_model, init_weights
from crucible.model.hf import from_hf, hf_family, to_hf
from crucible.model.presets import get_preset

TOL = 1e-5  # fp32 logits of the same weights through two implementations (op order differs)


def _tiny(**over: object) -> Bert:
    cfg = get_preset("bert-tiny").model_copy(update={"n_layers": 3, **over})
    model = init_weights(build_model(cfg), seed=1).eval()
    assert isinstance(model, Bert)
    return model


def _batch(gen_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(gen_seed)
    tokens = torch.randint(5, 512, (3, 40), generator=g)
    types = torch.zeros_like(tokens)
    types[:, 21:] = 1
    return tokens, types


def test_logits_and_loss_equal_hugging_face_both_ways() -> None:
    model = _tiny()
    hf = to_hf(model)
    assert type(hf).__name__ == "BertForPreTraining" and hf_family(model.cfg) == "bert"
    tokens, types = _batch()
    with torch.no_grad():
        out = hf(input_ids=tokens, token_type_ids=types)
        mlm, nsp = model.predict(tokens, types)
    assert (out.prediction_logits - mlm).abs().max() <= TOL
    assert (out.seq_relationship_logits - nsp).abs().max() <= TOL

    # the pre-training loss: masked-LM cross-entropy over masked positions plus NSP's
    labels = torch.full_like(tokens, -100)
    labels[:, [3, 17, 30]] = tokens[:, [3, 17, 30]]
    nsp_labels = torch.tensor([0, 1, 0])
    with torch.no_grad():
        theirs = hf(
            input_ids=tokens, token_type_ids=types, labels=labels, next_sentence_label=nsp_labels
        ).loss
        masked, ours = model(tokens, labels, token_types=types, nsp_labels=nsp_labels)
    assert ours is not None and abs(float(theirs) - float(ours)) <= TOL
    # the decoder ran on the masked positions only, with the logits predict gives there
    assert masked.shape == (9, 512) and (masked - mlm[labels != -100]).abs().max() <= TOL

    back = from_hf(hf)
    assert back.mlm.decoder.weight is back.tok_emb.weight  # type: ignore[union-attr]
    with torch.no_grad():
        mlm2, nsp2 = back.predict(tokens, types)  # type: ignore[operator]
    assert torch.equal(mlm2, mlm) and torch.equal(nsp2, nsp)


def test_padding_groups_match_hugging_face_attention_mask() -> None:
    model = _tiny()
    hf = to_hf(model)
    tokens, types = _batch(1)
    attention = torch.ones_like(tokens)
    attention[0, 30:] = 0
    groups = torch.zeros_like(tokens)
    groups[0, 30:] = -1  # padding: real tokens never attend to it
    with torch.no_grad():
        out = hf(input_ids=tokens, token_type_ids=types, attention_mask=attention)
        mlm, nsp = model.predict(tokens, types, groups)
    real = attention.bool()
    assert (out.prediction_logits[real] - mlm[real]).abs().max() <= TOL
    assert (out.seq_relationship_logits - nsp).abs().max() <= TOL


def test_attention_is_bidirectional() -> None:
    model = _tiny()
    tokens, _ = _batch(2)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    with torch.no_grad():
        a, _ = model.predict(tokens)
        b, _ = model.predict(changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # the first position sees the last


def test_a_batch_without_masked_tokens_still_backprops() -> None:
    model = _tiny()
    model.train()
    tokens, types = _batch(3)
    _, loss = model(tokens, torch.full_like(tokens, -100), token_types=types)
    assert loss is not None and float(loss.detach()) == 0.0
    loss.backward()  # every parameter the loss reads gets a (zero) gradient, no error


def test_bert_shapes_are_checked_at_validation() -> None:
    base = dict(arch="bert", vocab_size=30, n_layers=1, n_heads=2, d_model=8, max_seq_len=16)
    ModelConfig(**base)
    for over, field in [
        ({"pos": "rotary"}, "pos"),
        ({"norm": "rmsnorm"}, "norm"),
        ({"mlp": "swiglu"}, "mlp"),
        ({"tie_embeddings": False}, "tie_embeddings"),
        ({"n_kv_heads": 1}, "n_kv_heads"),
    ]:
        with pytest.raises(ValidationError, match=field):
            ModelConfig(**(base | over))
    with pytest.raises(ValueError, match="no KV cache"):
        _tiny()(torch.zeros(1, 4, dtype=torch.long), cache=object())  # type: ignore[arg-type]
