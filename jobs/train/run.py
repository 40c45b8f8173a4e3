"""The driver of a train job: checks, then one Ray Train ``TorchTrainer`` over the workers.

Runs inside the Ray job (``python -m crucible.jobs.entry RUN_DIR``). Everything that can be
checked before any worker starts is checked here, once, with one-line errors: the shards
exist, match the model's vocabulary and context and pass their checksums; the cluster can
ever provide the workers asked for (Ray would otherwise wait for them forever); a checkpoint
written with another world size is converted to DeepSpeed's universal format.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from crucible.cluster.storage import Location, location, read_jsonl
from crucible.errors import CrucibleError
from crucible.jobs.runs import load_train_spec, stop_request
from crucible.jobs.spec import FinetuneRunSpec, RewardRunSpec, TrainRunSpec
from crucible.jobs.train import checkpoint as ckpt

if TYPE_CHECKING:
    from crucible.data_pipeline.shards.manifest import Manifest


def check_shards(spec: TrainRunSpec) -> Manifest:
    """Check the shards as the workers will need them, from their manifest and a listing;
    return the manifest.

    On a local or shared filesystem the files are checked as ``data.verify`` says (sha256
    for sets up to 2 GiB by default); on an object store by size here (each node checks every
    file's sha256 as it fetches it).

    Args:
        spec: the train spec.

    Raises:
        CrucibleError: missing/corrupt shards, or token ids or rows the model cannot take.
    """
    from crucible.data_pipeline.shards.manifest import read_manifest, verify_shards

    shards = location(spec.data.shards)
    manifest = read_manifest(shards)
    verify_shards(shards, manifest, spec.data.verify if shards.is_local else "size")
    if manifest.splits["train"].rows == 0:
        raise CrucibleError(f"split 'train' of {shards} is empty")
    cfg = spec.model.resolve()
    vocab = manifest.tokenizer.vocab_size
    if vocab > cfg.vocab_size:
        raise CrucibleError(
            f"shards {spec.data.shards} use a {vocab}-token vocabulary but the model has "
            f"vocab_size {cfg.vocab_size}; set model.vocab_size to at least {vocab}"
        )
    if spec.objective.kind == "mlm":
        from crucible.data_pipeline.tokens.tokenizer import bert_special_ids, load_tokenizer

        if manifest.chat_template is not None:
            raise CrucibleError(f"shards {spec.data.shards} hold conversations; masked-LM "
                                "training takes plain-text shards")  # fmt: skip
        bert_special_ids(load_tokenizer(shards / manifest.tokenizer.file))
    if manifest.chat_template is not None and not spec.data.mask_cross_document:
        raise CrucibleError(
            f"shards {spec.data.shards} hold packed conversations: set "
            "data.mask_cross_document: true so that examples do not attend to each other"
        )
    prompts = spec.train.eval_prompts
    if prompts is not None and not location(prompts).is_file():
        raise CrucibleError(f"train.eval_prompts: {prompts} does not exist")
    if manifest.comparisons != isinstance(spec, RewardRunSpec):
        raise CrucibleError(
            f"shards {spec.data.shards} hold comparisons (ranked answers): train a reward model "
            "on them with kind: reward"
            if manifest.comparisons
            else f"kind: reward needs comparison shards, and {spec.data.shards} are not: build "
            "them with a data run whose reader.chat has comparisons: true"
        )
    if manifest.seq_len > cfg.max_seq_len:
        raise CrucibleError(
            f"shards {spec.data.shards} hold {manifest.seq_len}-token rows but the model's "
            f"max_seq_len is {cfg.max_seq_len}; raise it or repack the shards"
        )
    return manifest


def decide_gpu(spec: TrainRunSpec, resources: dict[str, float]) -> bool:
    """GPU workers if the spec says so, or (``use_gpu: null``) if the cluster has GPUs.

    Args:
        spec: the train spec.
        resources: ``ray.cluster_resources()``.
    """
    if spec.train.use_gpu is not None:
        return bool(spec.train.use_gpu)
    return resources.get("GPU", 0) > 0


def check_resources(spec: TrainRunSpec, resources: dict[str, float], use_gpu: bool) -> None:
    """Refuse a run the cluster can never schedule, instead of waiting forever.

    Args:
        spec: the train spec.
        resources: ``ray.cluster_resources()`` (totals, not what is free now).
        use_gpu: whether workers need a GPU each.
    """
    t = spec.train
    check_worker_resources(t.num_workers, t.cpus_per_worker, resources, use_gpu, "train")


def check_worker_resources(
    num_workers: int, cpus_per_worker: float, resources: dict[str, float], use_gpu: bool,
    section: str, keys: tuple[str, str] = ("num_workers", "cpus_per_worker"),
) -> None:  # fmt: skip
    """Refuse a worker group the cluster can never hold (totals, not what is free now).

    Args:
        num_workers: workers of the group.
        cpus_per_worker: CPUs each.
        resources: ``ray.cluster_resources()``.
        use_gpu: whether each worker needs a GPU.
        section: the spec section that sets the group's size (named in the error).
        keys: that section's keys of the count and of the CPUs each.
    """
    need = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        need["GPU"] = num_workers
    short = {k: v for k, v in need.items() if resources.get(k, 0) < v}
    if short:
        have = ", ".join(f"{resources.get(k, 0):g} {k}" for k in short)
        want = ", ".join(f"{v:g} {k}" for k, v in short.items())
        raise CrucibleError(
            f"the run needs {want} ({num_workers} {keys[0].removeprefix('num_')}) but the "
            f"cluster has {have}; lower {section}.{keys[0]} / {section}.{keys[1]} or add nodes"
        )


def worker_group(
    loop: Any, run_dir: Location, use_gpu: bool, num_workers: int, cpus_per_worker: float,
    max_failures: int, placement_strategy: str = "PACK", extra: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """The Ray Train ``TorchTrainer`` that runs ``loop`` on every worker of a run: NCCL or
    gloo, one GPU per worker on GPUs, its attempts recorded under ``<run>/ray``, restarted
    up to ``max_failures`` times after a lost worker.

    Args:
        loop: the per-worker function (it gets ``{run_dir, use_gpu}``).
        run_dir: the run directory.
        use_gpu: GPU workers.
        num_workers: workers (data-parallel ranks).
        cpus_per_worker: CPUs reserved per worker.
        max_failures: worker-group restarts before the run fails.
        placement_strategy: Ray's placement of the workers on nodes.
        extra: more entries of the loop's config (Ray actor handles travel in it).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    attempts = run_dir / "ray"
    return TorchTrainer(
        loop,
        train_loop_config={"run_dir": run_dir.uri, "use_gpu": use_gpu} | (extra or {}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {}),
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=attempts.path,
            storage_filesystem=attempts.fs,
            name=f"attempt-{len(attempts.glob('attempt-*'))}",
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def check_placement(spec: TrainRunSpec, nodes: list[dict[str, float]], use_gpu: bool) -> None:
    """Refuse a placement the cluster's nodes can never satisfy (Ray would wait forever).

    A worker's resources must fit on one node, so totals are not enough: two 1-CPU nodes
    hold two 1-CPU workers, but not one 2-CPU worker, and STRICT_SPREAD needs one node
    per worker.

    Args:
        spec: the train spec.
        nodes: the resource totals of each alive node (``ray.nodes()[i]["Resources"]``).
        use_gpu: whether workers need a GPU each.
    """
    t = spec.train
    need = {"CPU": t.cpus_per_worker} | ({"GPU": 1.0} if use_gpu else {})
    # How many workers each node can hold on its own.
    fits = [int(min(node.get(k, 0) // v for k, v in need.items())) for node in nodes]
    strategy = t.placement_strategy
    # How many of the workers the placement can ever hold.
    if strategy == "STRICT_SPREAD":
        have = sum(f >= 1 for f in fits)
        what = f"one node per worker, but {have} node(s) can hold a worker"
    elif strategy == "STRICT_PACK":
        have = max(fits, default=0)
        what = f"all workers on one node, but the largest node holds {have}"
    else:
        have = sum(fits)
        what = f"each worker within one node, and the nodes hold {have} in all"
    if have < t.num_workers:
        per = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise CrucibleError(
            f"train.placement_strategy {strategy} with {t.num_workers} workers of {per} "
            f"needs {what}; add nodes, lower train.num_workers / train.cpus_per_worker, "
            "or choose another train.placement_strategy"
        )


def alive_node_resources() -> list[dict[str, float]]:
    """The resource totals of each alive node of the Ray cluster this process is attached to."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [dict(n["Resources"]) for n in nodes if n.get("Alive")]


def prepare_reshard(
    root: Location, world: int, tags: tuple[str, ...] = (ckpt.DS_TAG,)
) -> Location | None:
    """Convert the checkpoint the workers will resume from to DeepSpeed's universal format
    when it was written with another world size; return the converted copy.

    The driver reads manifests only: the conversion (which reads the whole checkpoint,
    checking every file's sha256) runs as a Ray task on whichever node has room.

    Args:
        root: the checkpoints directory.
        world: the world size of this attempt.
        tags: the DeepSpeed tags (engines) the checkpoint holds.
    """
    import ray

    found = ckpt.latest_committed(root)
    if found is None:
        return None
    path, manifest = found
    saved = int(manifest["world_size"])
    if saved == world:
        return None
    from crucible.jobs.train.reshard import ensure_universal, say_converted

    t0 = time.perf_counter()
    out: Location = ray.get(ray.remote(num_cpus=1)(ensure_universal).remote(path, tags))
    say_converted(path, saved, world, time.perf_counter() - t0)
    return out


def run_train(run_dir: Location) -> int:
    """Train (or resume) the run in ``run_dir`` on the Ray cluster this process is attached
    to; return an exit code.

    Args:
        run_dir: the run directory (holding ``spec.resolved.yaml``).

    Raises:
        CrucibleError: bad shards, too few resources, or a NaN loss.
    """
    import ray

    from crucible.jobs.train.loop import train_loop_per_worker

    spec = load_train_spec(run_dir)
    manifest = check_shards(spec)
    if isinstance(spec, FinetuneRunSpec):
        from crucible.jobs.finetune.base import check_base

        check_base(spec, manifest.tokenizer.fingerprint)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    start_metrics_registry()
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    use_gpu = decide_gpu(spec, resources)
    check_resources(spec, resources, use_gpu)
    check_placement(spec, alive_node_resources(), use_gpu)
    (run_dir / "nan.json").rm()
    root = run_dir / "checkpoints"
    root.mkdirs()
    prepare_reshard(root, spec.train.num_workers)
    if isinstance(spec, FinetuneRunSpec):
        from crucible.jobs.finetune.base import prepare_base

        t0 = time.perf_counter()
        base = prepare_base(spec, run_dir)
        print(f"base model ready in {base} ({time.perf_counter() - t0:.1f} s)", flush=True)
    t = spec.train
    trainer = worker_group(
        train_loop_per_worker, run_dir, use_gpu, t.num_workers, t.cpus_per_worker,
        t.max_failures, t.placement_strategy,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit()
    nan = run_dir / "nan.json"
    if nan.is_file():
        info = nan.read_json()
        gave_up = f" ({info['gave_up']})" if info.get("gave_up") else ""
        raise CrucibleError(
            f"{info.get('what') or 'loss became ' + info['loss']} at step {info['step']} "
            f"(global batch {info['batch_index']}, samples {info['samples'][0]}–"
            f"{info['samples'][1] - 1}); stopped{gave_up}; last good checkpoint: "
            f"{info['last_checkpoint']}"
        )
    print(summarize(run_dir, time.perf_counter() - t0), flush=True)
    if stop_request(run_dir).is_file():
        print(f"stopped on request; `crucible resume {run_dir}` continues it", flush=True)
    return 0


def start_metrics_registry() -> None:
    """Make sure the cluster's scrape-target registry runs (this driver is on the head node);
    metrics never stop a job, so a failure is a warning."""
    try:
        from crucible.monitoring.discovery import ensure_registry

        ensure_registry()
    except Exception as e:
        print(f"warning: metrics discovery unavailable ({type(e).__name__}: {e})", flush=True)


def summarize(run_dir: Location, seconds: float) -> str:
    """A short end-of-run summary from ``metrics.jsonl`` and the latest checkpoint.

    Args:
        run_dir: the run directory.
        seconds: wall time of this job's training.
    """
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    saves = [r for r in records if r.get("kind") == "checkpoint"]
    latest = ckpt.latest_committed(run_dir / "checkpoints")
    lines = [f"trained in {seconds:.1f} s"]
    if steps:
        last = steps[-1]
        tps = sum(r["tokens"] for r in steps) / sum(r["step_seconds"] for r in steps)
        lines.append(f"step {last['step']}: loss {last['loss']:.4f}; {tps:,.0f} tokens/s")
    if saves:
        # write_seconds is the write itself; save_seconds only the loop's wait for it (an
        # asynchronous save's copy to host memory). Records from before async saves lack it.
        written = sum(r.get("write_seconds", r["save_seconds"]) for r in saves)
        blocked = sum(r["save_seconds"] for r in saves)
        mbps = sum(r["bytes"] for r in saves) / max(written, 1e-9) / 1e6
        lines.append(
            f"checkpoint saves: {len(saves)}, written at {mbps:.1f} MB/s, "
            f"training blocked {blocked:.1f} s"
        )
    if latest is not None:
        ledger = ckpt.read_state(latest[0])["ledger"]
        lines.append(
            f"latest checkpoint: {latest[0]}; worker-hours {ledger['worker_seconds'] / 3600:.4f}"
        )
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)
