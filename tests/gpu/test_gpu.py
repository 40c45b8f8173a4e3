"""The GPU path, on a real NVIDIA GPU (skipped without one; ``make gpu-check`` runs them and
the GPU benchmarks): crucible's engine with ZeRO-3, bf16, NCCL and DeepSpeed's fused Adam;
SDPA's flash kernel chosen for the model's attention; activation checkpointing; the train job
(under torchrun: these machines need no Ray) killed with SIGKILL after a checkpoint and
resumed with bitwise-equal losses in deterministic mode; export to ``transformers`` with the
same logits on the GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crucible.cluster.storage import location
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROBE = Path(__file__).with_name("probe.py")
STEPS, EVERY = 200, 50  # long enough after step EVERY for the kill to land mid-run


def probe(kind: str) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), kind], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine_facts() -> dict:
    return probe("engine")


def test_engine_is_zero3_bf16_on_nccl_with_fused_adam(engine_facts) -> None:
    f = engine_facts
    assert f["backend"] == "nccl" and f["device"].startswith("cuda")
    assert f["zero_stage"] == 3 and f["bf16"] and f["param_dtype"] == "torch.bfloat16"
    assert f["optimizer"].endswith("FusedAdam"), f["optimizer"]
    assert all(map(torch.isfinite, torch.tensor(f["losses"])))
    assert f["losses"][-1] < f["losses"][0]  # 8 steps on one batch: it learns it


def test_attention_runs_a_flash_kernel(engine_facts) -> None:
    """SDPA picks a flash-attention kernel (FlashAttention-2, or cuDNN's, which SDPA prefers
    on Hopper in recent torch), never the memory-efficient or the unfused math path."""
    kernels = engine_facts["attention_kernels"]
    assert kernels["flash"] or kernels["cudnn"], kernels  # forward and backward
    assert not kernels["memory_efficient"], kernels


def test_activation_checkpointing_recomputes_the_same_and_saves_memory() -> None:
    f = probe("checkpointing")
    assert f["loss_on"] == f["loss_off"]  # the forward is the same computation
    # The recomputed forward is bitwise the first in deterministic mode, so the gradients
    # agree to bf16 accumulation-order noise at most.
    assert f["max_grad_abs_diff"] <= 1e-2 * f["max_grad_abs"], f
    assert f["peak_bytes_on"] < 0.7 * f["peak_bytes_off"], f


def _spec(name: str, storage: Path, shards: Path, steps: int = STEPS) -> TrainRunSpec:
    spec = parse_spec({
        "kind": "train", "name": name, "cluster": {"storage": str(storage)},
        "model": {"preset": "debug", "max_seq_len": 64},
        "data": {"shards": str(shards)},
        "optim": {"global_batch_size": 16, "micro_batch_size": 8, "warmup_steps": 5,
                  "lr": 1e-3},
        "checkpoint": {"every_steps": EVERY, "keep_last": 3},
        "train": {"num_workers": 1, "max_steps": steps},
    })  # fmt: skip
    assert isinstance(spec, TrainRunSpec)
    return spec


def standalone(run_dir: Path, nproc: int = 1, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crucible.jobs.train.standalone", str(run_dir),
         "--nproc", str(nproc)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        **kw,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    return out


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(run_dir)}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-runs")


@pytest.fixture(scope="module")
def reference(storage: Path, train_shards: Path) -> Path:
    run_dir = Path(prepare_run(_spec("gpu-ref", storage, train_shards)).path)
    finish(standalone(run_dir))
    return run_dir


def test_train_job_on_the_gpu_resumes_bitwise_after_sigkill(storage, train_shards, reference):
    run_dir = Path(prepare_run(_spec("gpu-killed", storage, train_shards)).path)
    proc = standalone(run_dir)
    root = location(run_dir / "checkpoints")
    # killed by the run's own progress: once step EVERY is committed, while it trains on
    while EVERY not in ckpt.committed_steps(root) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run_dir), default=0)
    assert killed_at < STEPS
    out = finish(standalone(run_dir))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    resumes = [r for r in map(json.loads, lines) if r["kind"] == "resume"]
    assert len(resumes) == 1 and EVERY <= resumes[0]["step"] < STEPS, out[-3000:]
    assert losses(run_dir) == losses(reference)  # every step, bitwise
    peak = [r["device_memory_peak_bytes"] for r in step_records(run_dir)]
    assert all(p > 0 for p in peak)


def test_export_gives_transformers_the_same_logits_on_the_gpu(reference, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from crucible.jobs.train.export import export_checkpoint, load_model

    step = ckpt.step_path(location(reference / "checkpoints"), STEPS)
    out = export_checkpoint(step, "hf", tmp_path / "hf")
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = load_model(step).cuda().eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").cuda().eval()
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, _ = ours(tokens)
        b = theirs(tokens).logits
    # fp32 on the same GPU; the two stacks order some sums differently
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
