"""GGUF export (model/gguf.py, ``crucible export --format gguf``) read back with the ``gguf``
package's reader: metadata, every tensor's name, shape and type, and the model it holds.

Two committed checkpoints: the suite's ``tiny_checkpoint`` (GPT-2-style, llama.cpp ``gpt2``)
and one built here the same way from the ``debug`` preset cut down (LLaMA-style with GQA,
llama.cpp ``llama``). Both have peaked logits (init std 0.2) so that greedy decoding is not a
tie-break between near-equal logits.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.jobs.evaluation import perplexity
from crucible.model.generate import generate
from crucible.model.gguf import permute_rotary, read_gguf, unpermute_rotary, write_gguf
from crucible.model.gpt import GPT, apply_rotary, build_model, init_weights, rotary_cos_sin
from crucible.model.hf import state_dict_to_hf

pytestmark = pytest.mark.usefixtures("one_thread")

# debug (LLaMA-style, rope theta 5e5) cut to CPU size; d_ff 80 is not a whole number of
# 32-value blocks, so ffn_down's rows stay f16 in quantised files.
LLAMA = {"preset": "debug", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 80, "vocab_size": 512, "max_seq_len": 128, "init_std": 0.2}  # fmt: skip
PROMPTS = ["the cat of", "and to in a is that for it as was with the", "of the", "it was"]


@pytest.fixture
def llama_checkpoint(fake_checkpoint: Any) -> tuple[Path, GPT]:
    """A committed checkpoint of a LLaMA-style run, as ``tiny_checkpoint`` is built."""
    return fake_checkpoint("llama", LLAMA)  # type: ignore[no-any-return]


@pytest.fixture(params=["gpt2", "llama"])
def run(request: pytest.FixtureRequest) -> tuple[str, Path, GPT]:
    """(llama.cpp architecture, run directory, the checkpoint's model)."""
    name = "tiny_checkpoint" if request.param == "gpt2" else "llama_checkpoint"
    run_dir, model = request.getfixturevalue(name)
    return request.param, run_dir, model


def _tokenizer(shards: Path) -> tuple[Any, int]:
    info = read_manifest(shards).tokenizer
    return load_tokenizer(shards / info.file), info.eos_id


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def _expected_tensors(arch: str, model: GPT, quant: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (ggml shape, type) of what llama.cpp's convert_hf_to_gguf.py writes for the
    Hugging Face model of the same shape: its names come from gguf's own tensor map."""
    cfg = model.cfg
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    out = {}
    for hf_name, t in state_dict_to_hf(model.state_dict(), cfg).items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # save_pretrained drops a tied head; llama.cpp reuses token_embd
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        shape = tuple(t.shape)
        if arch == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            shape = shape[::-1]  # Conv1D stores [in, out]; the converter transposes
        one_d = len(shape) == 1 or name.endswith((".bias", "_norm.weight"))
        if one_d or name.startswith("position_embd"):
            kind = "F32"
        elif quant == "f16" or shape[-1] % 32:
            kind = "F16"
        else:
            kind = quant.upper()
        out[name] = (shape[::-1], kind)
    return out


def test_metadata_tensors_and_vocab_as_llama_cpp_reads_them(
    run: tuple[str, Path, GPT],
    train_shards: Path,
    tmp_path: Path,
    cli: Any,
) -> None:
    arch, run_dir, model = run
    cfg = model.cfg
    out = tmp_path / f"{arch}-q8_0.gguf"
    argv = ["export", str(run_dir), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]
    rc, stdout, err = cli(argv)
    assert rc == 0, err
    assert f"wrote {arch} GGUF (q8_0" in stdout
    if arch == "llama":
        assert "kept f16 (rows not whole q8_0 blocks): blk.0.ffn_down.weight" in stdout

    reader = gguf.GGUFReader(out)
    meta = {
        "general.architecture": arch,
        "general.name": run_dir.name,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.feed_forward_length": cfg.ffn_dim,
        f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": cfg.kv_heads,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if arch == "llama":
        meta |= {
            "llama.rope.freq_base": 500000.0,
            "llama.rope.dimension_count": cfg.head_dim,
            "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps),
        }
        assert cfg.kv_heads == 2 and cfg.n_heads == 4
    else:
        meta["gpt2.attention.layer_norm_epsilon"] = pytest.approx(cfg.norm_eps)
    assert {k: _field(reader, k) for k in meta} == meta

    tok, eos = _tokenizer(train_shards)
    vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's name (llama-vocab.cpp)
    assert len(tokens) == len(types) == cfg.vocab_size > len(vocab)
    assert tokens[: len(vocab)] == [vocab[i] for i in range(len(vocab))]
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]"
    assert types[eos] == gguf.TokenType.CONTROL and tokens[eos] == "<|endoftext|>"
    assert types[len(vocab)] == gguf.TokenType.UNUSED
    assert types.count(gguf.TokenType.NORMAL) == len(vocab) - 1
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False

    got = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    assert got == _expected_tensors(arch, model, "q8_0")
    if arch == "llama":
        assert got["blk.1.attn_k.weight"] == ((64, 32), "Q8_0")  # 2 K/V heads of 16
        assert got["output.weight"] == ((64, 512), "Q8_0")  # untied head
    else:
        assert got["blk.0.attn_qkv.weight"] == ((64, 192), "Q8_0")  # fused, as llama.cpp's gpt2
        assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n.rsplit(".", 1)[0]) for n in got} <= known


def test_rotary_permutation_gives_llama_cpp_interleaved_pairs() -> None:
    # llama.cpp's llama (rope mode NORM) rotates neighbours (x[2i], x[2i+1]) by pos·θ^(-2i/d);
    # crucible rotates (x[i], x[i + d/2]). Q from permuted rows under llama.cpp's rotary must
    # be the permutation of crucible's rotated Q.
    from crucible.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=8, n_layers=1, n_heads=3, d_model=24, max_seq_len=16,
                      pos="rotary", norm="rmsnorm", mlp="swiglu", rope_theta=500000.0)  # fmt: skip
    hd, heads = cfg.head_dim, cfg.n_heads
    w = torch.randn(heads * hd, cfg.d_model, dtype=torch.float64)
    x = torch.randn(5, cfg.d_model, dtype=torch.float64)
    pos = torch.arange(5)

    cos, sin = rotary_cos_sin(cfg, pos, torch.float64)
    ours = apply_rotary((x @ w.T).view(5, heads, hd).transpose(0, 1), cos, sin)  # [H, T, hd]

    theirs = (x @ permute_rotary(w, heads).T).view(5, heads, hd // 2, 2)
    theta = pos[:, None].double() * cfg.rope_theta ** (-torch.arange(0, hd, 2).double() / hd)
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    a, b = theirs[..., 0], theirs[..., 1]
    theirs = torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(5, heads * hd)

    assert torch.allclose(permute_rotary(ours.transpose(0, 1).reshape(5, -1).T, heads).T, theirs)
    assert torch.equal(unpermute_rotary(permute_rotary(w, heads), heads), w)


@torch.no_grad()
def test_f32_is_exact_and_f16_logits_are_close(
    run: tuple[str, Path, GPT], train_shards: Path, tmp_path: Path
) -> None:
    _, _, model = run
    tok, eos = _tokenizer(train_shards)
    x = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(0))
    want = model(x)[0]
    write_gguf(model, tmp_path / "f32.gguf", "f32", tok, eos)
    assert torch.equal(read_gguf(tmp_path / "f32.gguf")(x)[0], want)

    write_gguf(model, tmp_path / "f16.gguf", "f16", tok, eos)
    back = read_gguf(tmp_path / "f16.gguf")
    same = ("vocab_size", "n_layers", "n_heads", "kv_heads", "d_model", "ffn_dim", "max_seq_len",
            "pos", "norm", "mlp", "bias", "tie_embeddings", "rope_theta", "norm_eps")  # fmt: skip
    assert [getattr(back.cfg, k) for k in same] == [getattr(model.cfg, k) for k in same]
    got = back(x)[0]
    # f16 keeps 11 significant bits: logits of spread ~10 move by a few hundredths at most.
    assert (got - want).abs().max() < 0.05 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.99


@functools.cache
@torch.enable_grad()  # called from no_grad tests
def _confident(arch: str) -> GPT:
    """A model of each architecture trained (60 AdamW steps, seconds on a CPU) to continue a
    fixed random successor chain over 320 ids: the confident next tokens of a trained model,
    which a random-init one lacks (its top two logits are often within q8_0's rounding)."""
    from crucible.model.presets import get_preset

    cfg = get_preset("tiny") if arch == "gpt2" else get_preset("debug")
    if arch == "llama":
        cfg = cfg.model_copy(
            update={k: v for k, v in LLAMA.items() if k not in ("preset", "init_std")}
        )
    gen = torch.Generator().manual_seed(0)
    successor = torch.randperm(320, generator=gen)
    model = init_weights(build_model(cfg), seed=4).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        rows = [torch.randint(0, 320, (16,), generator=gen)]
        for _ in range(64):
            rows.append(successor[rows[-1]])
        seq = torch.stack(rows, dim=1)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    return model.eval()


@torch.no_grad()
def test_q8_0_greedy_tokens_equal_crucibles(
    run: tuple[str, Path, GPT], train_shards: Path, tmp_path: Path
) -> None:
    arch, _, model = run
    confident = _confident(arch)
    tok, eos = _tokenizer(train_shards)
    ids = [tok.encode(p).ids for p in PROMPTS] + [[t] for t in range(0, 320, 40)]
    write_gguf(confident, tmp_path / "confident.gguf", "q8_0", tok, eos)
    back = read_gguf(tmp_path / "confident.gguf")
    assert generate(back, ids, 32) == generate(confident, ids, 32)  # 12 prompts, 32 tokens

    # The random-init checkpoint (init std 0.2): q8_0 moves logits by up to ~0.1–0.3 of
    # their std and flips some near-ties; measured top-1 agreement 0.95–0.98 on held-out rows.
    write_gguf(model, tmp_path / "q8.gguf", "q8_0", tok, eos)
    back = read_gguf(tmp_path / "q8.gguf")
    x = next(TrainingReader(str(train_shards), 16, split="heldout").eval_batches())["input_ids"]
    agree = (back(x)[0].argmax(-1) == model(x)[0].argmax(-1)).float().mean()
    assert agree > 0.9


def test_size_and_perplexity_per_quant(
    run: tuple[str, Path, GPT], train_shards: Path, tmp_path: Path
) -> None:
    arch, _, model = run
    tok, eos = _tokenizer(train_shards)
    rows = [("f32 (crucible)", 0, perplexity(model, str(train_shards), "heldout", 8, None, False))]
    for quant in ("f32", "f16", "q8_0", "q5_0", "q4_0"):
        path = tmp_path / f"{quant}.gguf"
        write_gguf(model, path, quant, tok, eos)
        ppl = perplexity(read_gguf(path), str(train_shards), "heldout", 8, None, False)
        rows.append((quant, path.stat().st_size, ppl))
    base = rows[0][2]["perplexity"]
    print(f"\n{arch}: {model.cfg.n_layers} layers, d {model.cfg.d_model}, held-out split, "
          f"{rows[0][2]['tokens']:.0f} tokens")  # fmt: skip
    for name, size, ppl in rows:
        delta = ppl["perplexity"] / base - 1
        print(f"  {name:15s} {size:>9,d} B  ppl {ppl['perplexity']:10.3f}  ({delta:+.3%})")
    by = {name: (size, ppl["perplexity"]) for name, size, ppl in rows}
    assert by["f32"][1] == pytest.approx(base, rel=1e-6)
    assert by["f16"][1] == pytest.approx(base, rel=1e-3)
    assert by["q8_0"][1] == pytest.approx(base, rel=1e-2)
    sizes = [by[q][0] for q in ("f32", "f16", "q8_0", "q5_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    assert all(math.isfinite(by[q][1]) for q in by)


def test_export_refuses_what_it_cannot_write(
    tiny_checkpoint: tuple[Path, GPT], tmp_path: Path, cli: Any
) -> None:
    run_dir, _ = tiny_checkpoint
    base = ["export", str(run_dir), "--out", str(tmp_path / "m.gguf")]
    rc, _, err = cli([*base, "--format", "gguf", "--quant", "q4_k_m"])
    assert rc == 2
    assert "llama-quantize" in err and "Q4_K_M" in err and "--quant f16" in err
    rc, _, err = cli([*base, "--format", "gguf", "--quant", "q3"])
    assert rc == 2 and "not one of f32, f16, q8_0" in err
    rc, _, err = cli([*base, "--format", "hf", "--quant", "q8_0"])
    assert rc == 2 and "--quant is for --format gguf" in err
    rc, _, err = cli([*base, "--format", "gguf", "--dtype", "bf16"])
    assert rc == 2 and "--dtype is for hf and torch" in err
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_llama_cpps_gpt2_vocab_cannot_reproduce_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from crucible.errors import CrucibleError
    from crucible.model.presets import get_preset

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = init_weights(build_model(get_preset("tiny")))
    with pytest.raises(CrucibleError, match="pre-tokenizer Whitespace"):
        write_gguf(model, tmp_path / "m.gguf", "f16", tok, 0)
    assert not list(tmp_path.iterdir())
