"""``crucible plan``: memory, batch, time, GPU-hours, energy and cost of a run, before renting
a GPU; the per-rank plan ``crucible train run --dry-run`` prints; ``crucible cluster
config``: Ray cluster launcher / KubeRay configs sized from a plan. All three come from the
one planner (:mod:`crucible.cluster.plan`) that the train job runs.

``crucible plan SPEC.yaml [--nodes N --gpu a100-80gb --set key=value]`` plans a train spec;
``crucible plan --model gpt3-175b --nodes 128 --gpu a100-80gb --tokens 300e9`` plans a preset
without a spec (ZeRO-3 unless ``--zero`` says otherwise).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from crucible.cluster.plan import Plan, RunPlan, format_bytes, plan, plan_from_spec
from crucible.cluster.plan.render import plan_renderable
from crucible.cluster.spec import ClusterSpec
from crucible.config import validate
from crucible.errors import CrucibleError
from crucible.model.spec import ParallelSpec, resolve_model

if TYPE_CHECKING:
    from crucible.jobs.spec import TrainRunSpec


def _spec_overrides(
    nodes: int | None, gpu: str | None, gpus_per_node: int | None, extra: list[str]
) -> list[str]:
    out = []
    if nodes is not None:
        out.append(f"cluster.nodes={nodes}")
    if gpu is not None:
        out.append(f"cluster.gpu={gpu}")
    if gpus_per_node is not None:
        out.append(f"cluster.gpus_per_node={gpus_per_node}")
    return out + extra


def plan_from_args(
    spec_path: Path | None,
    *,
    model: str | None = None,
    nodes: int | None = None,
    gpu: str | None = None,
    gpus_per_node: int | None = None,
    tokens: float | None = None,
    global_batch: int | None = None,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    zero: int | None = None,
    checkpointing: bool | None = None,
    zeropp: bool = False,
    offload_optimizer: bool = False,
    mfu: float | None = None,
    overrides: list[str] | None = None,
) -> Plan:
    """The plan of a spec file, or of a preset given by flags (see :func:`plan_cmd`).

    Args:
        spec_path: a train spec YAML, or None to plan ``model`` from flags.
        model: a preset name (flag mode).
        nodes: nodes in the cluster.
        gpu: accelerator type.
        gpus_per_node: GPUs per node.
        tokens: training tokens (flag mode; a spec uses train.max_tokens).
        global_batch: sequences per step (flag mode).
        seq_len: sequence length (default: the model's context).
        micro_batch: micro-batch size (flag mode; None: the planner picks).
        zero: ZeRO stage (flag mode).
        checkpointing: activation checkpointing (flag mode; None: the planner picks).
        zeropp: ZeRO++ hpZ (a node) + qwZ + qgZ (flag mode).
        offload_optimizer: optimizer states in CPU memory (flag mode).
        mfu: assumed MFU instead of the step-time model.
        overrides: ``key.path=value`` overrides of the spec.
    """
    if spec_path is not None:
        if model is not None:
            raise CrucibleError("give either a spec file or --model, not both")
        from crucible.jobs.spec import TrainRunSpec, load_spec

        spec = load_spec(spec_path, _spec_overrides(nodes, gpu, gpus_per_node, overrides or []))
        if not isinstance(spec, TrainRunSpec):
            raise CrucibleError(f"{spec_path}: `crucible plan` needs a train spec (kind: train)")
        extra = {"assumed_mfu": mfu} if mfu is not None else {}
        if seq_len is not None:
            extra["seq_len"] = seq_len
        return plan_from_spec(spec, **extra)
    if model is None:
        raise CrucibleError("give a train spec file, or --model PRESET with --nodes and --gpu")
    if tokens is None or global_batch is None:
        raise CrucibleError("--model needs --tokens (e.g. 300e9) and --global-batch (sequences)")
    cluster = validate(
        ClusterSpec,
        {
            "gpu": gpu or "a100-80gb",
            "nodes": nodes or 1,
            **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}),
        },
        source="cluster",
    )
    stage = 3 if zero is None else zero
    parallel = validate(
        ParallelSpec,
        {
            "zero_stage": stage,
            "offload_optimizer": "cpu" if offload_optimizer else "none",
            **(
                {
                    "zero_hpz_partition_size": cluster.num_gpus // cluster.nodes,
                    "zero_quantized_weights": True,
                    "zero_quantized_gradients": True,
                }
                if zeropp
                else {}
            ),
        },
        source="model.parallel",
    )
    return plan(
        resolve_model(model, source="--model"),
        cluster,
        parallel,
        global_batch_size=global_batch,
        tokens=tokens,
        seq_len=seq_len,
        micro_batch_size=micro_batch,
        activation_checkpointing=checkpointing,
        assumed_mfu=mfu,
        model_name=model,
    )


def plan_cmd(
    spec: Path | None = typer.Argument(None, help="A train spec (YAML); or use --model."),
    model: str | None = typer.Option(None, "--model", help="Preset to plan without a spec."),
    nodes: int | None = typer.Option(None, "--nodes", help="Nodes (overrides cluster.nodes)."),
    gpu: str | None = typer.Option(None, "--gpu", help="a100-40gb, a100-80gb, h100-sxm, h200."),
    gpus_per_node: int | None = typer.Option(None, "--gpus-per-node", help="GPUs per node."),
    tokens: float | None = typer.Option(None, "--tokens", help="Training tokens (--model)."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="Sequences per step (--model)."
    ),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Sequence length."),
    micro_batch: int | None = typer.Option(
        None, "--micro-batch", help="Micro-batch (--model; default: fastest that fits)."
    ),
    zero: int | None = typer.Option(None, "--zero", help="ZeRO stage 1-3 (--model)."),
    checkpointing: bool | None = typer.Option(
        None, "--checkpointing/--no-checkpointing", help="Activation checkpointing (--model)."
    ),
    zeropp: bool = typer.Option(False, "--zeropp", help="ZeRO++ hpZ + qwZ + qgZ (--model)."),
    offload_optimizer: bool = typer.Option(
        False, "--offload-optimizer", help="Optimizer states in CPU memory (--model)."
    ),
    mfu: float | None = typer.Option(None, "--mfu", help="Assume this MFU (0-1) instead."),
    set_: list[str] = typer.Option([], "--set", help="Spec override key.path=value."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan a run: memory per GPU, micro-batch, step time, MFU, days, GPU-hours, MWh, $."""
    result = plan_from_args(
        spec,
        model=model,
        nodes=nodes,
        gpu=gpu,
        gpus_per_node=gpus_per_node,
        tokens=tokens,
        global_batch=global_batch,
        seq_len=seq_len,
        micro_batch=micro_batch,
        zero=zero,
        checkpointing=checkpointing,
        zeropp=zeropp,
        offload_optimizer=offload_optimizer,
        mfu=mfu,
        overrides=set_,
    )
    if as_json:
        data = asdict(result) | {
            "feasible": result.feasible,
            "num_gpus": result.num_gpus,
            "micro_batch_size": result.micro_batch_size,
            "grad_accum_steps": result.grad_accum_steps,
            "steps": result.steps,
            "memory_bytes": result.memory_bytes,
        }
        typer.echo(json.dumps(data, indent=1, default=str))
    else:
        Console(width=120).print(plan_renderable(result))
    if not result.feasible:
        raise typer.Exit(1)


def format_run_plan(spec: TrainRunSpec, plan: RunPlan) -> str:
    """The dry-run printout: the per-rank plan and the DeepSpeed config every rank runs.

    Args:
        spec: the train spec.
        plan: from :func:`crucible.cluster.plan.plan_run`.
    """
    cfg = spec.model.resolve()
    tokens = plan.total_steps * plan.tokens_per_step
    mem = plan.memory
    lines = [
        f"run {spec.name}: {spec.model.preset or 'custom'} model, {plan.params:,} parameters "
        f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"vocab {cfg.vocab_size})",
        f"workers: {plan.world_size} × {spec.train.cpus_per_worker:g} CPU"
        + (
            ", GPU (NCCL)"
            if spec.train.use_gpu
            else ", GPU if the cluster has them"
            if spec.train.use_gpu is None
            else ", CPU (gloo)"
        ),
        f"batch: global {plan.global_batch_size} sequences × {plan.seq_len} tokens = "
        f"{plan.tokens_per_step:,} tokens/step; micro-batch {plan.micro_batch_size} × "
        f"{plan.grad_accum_steps} accumulation steps × {plan.world_size} ranks",
        f"steps: {plan.total_steps:,} ({tokens:,.0f} tokens, "
        f"{6 * plan.params * tokens:.3g} FLOPs at 6·N·D; "
        f"{plan.flops_per_token * tokens:.3g} model FLOPs with attention)",
        f"memory per rank: {format_bytes(mem.total_bytes)} = model states "
        f"{format_bytes(mem.state_bytes - mem.gather_buffer_bytes)} "
        f"(ZeRO-{spec.model.parallel.zero_stage}, DeepSpeed's estimate) + gather buffer "
        f"{format_bytes(mem.gather_buffer_bytes)}"
        + (f" + hpZ shard {format_bytes(mem.hpz_bytes)}" if mem.hpz_bytes else "")
        + f" + activations {format_bytes(mem.activation_bytes)} (micro-batch "
        f"{plan.micro_batch_size}, checkpointing "
        f"{'on' if spec.model.parallel.activation_checkpointing else 'off'}) + logits "
        f"{format_bytes(mem.logits_bytes)}",
        f"checkpoints: every {spec.checkpoint.every_steps} steps, keep last "
        f"{spec.checkpoint.keep_last}"
        + (f" + every {spec.checkpoint.keep_every}" if spec.checkpoint.keep_every else "")
        + f", about {format_bytes(14 * plan.params)} each (14 bytes/param)",
        "DeepSpeed config:",
        json.dumps(plan.ds_config, indent=2),
    ]
    return "\n".join(lines)


def write_launch_config(
    spec_path: Path,
    target: str,
    out_dir: Path,
    *,
    nodes: int | None = None,
    gpu: str | None = None,
    provider: str = "aws",
    head_ip: str | None = None,
    worker_ips: list[str] | None = None,
    subnet: str | None = None,
    security_group: str | None = None,
    fabric: str | None = None,
    image: str = "",
    namespace: str = "default",
    token_secret: str = "crucible-ray-token",
    storage_claim: str = "crucible-storage",
    overrides: list[str] | None = None,
) -> list[Path]:
    """Plan a train spec and write what launches a cluster for it; return the files.

    ``ray-launcher``: the ``ray up`` YAML and a new auth token file for that cluster.
    ``kuberay``: the RayCluster, a RayJob carrying the resolved spec and the Prometheus
    Operator objects; the Dockerfile of the image they run; a new token file to create the
    cluster's Secret from.

    Args:
        spec_path: the train spec.
        target: ``ray-launcher`` or ``kuberay``.
        out_dir: directory for the written files.
        nodes: overrides cluster.nodes.
        gpu: overrides cluster.gpu.
        provider: ray-launcher provider, ``aws`` or ``local``.
        head_ip: local provider: the head machine.
        worker_ips: local provider: one address per node.
        subnet: AWS subnet of the nodes (EFA needs one).
        security_group: AWS security group of the nodes.
        fabric: ``efa`` or ``infiniband`` (default: efa on AWS, infiniband otherwise).
        image: KubeRay container image with crucible installed (default: the Dockerfile's).
        namespace: Kubernetes namespace.
        token_secret: Secret holding the Ray auth token under key ``auth_token``.
        storage_claim: ReadWriteMany PersistentVolumeClaim, when cluster.storage is a path.
        overrides: ``key.path=value`` spec overrides.
    """
    import re

    import yaml

    from crucible.cluster.kuberay import dockerfile, kuberay_manifests
    from crucible.cluster.launch import LaunchOptions, new_token, ray_launcher_config
    from crucible.jobs.runs import absolutize

    if target not in ("ray-launcher", "kuberay"):
        raise CrucibleError(f"--target {target!r} is invalid: use ray-launcher or kuberay")
    from crucible.jobs.spec import dump_spec, load_spec

    spec = load_spec(spec_path, _spec_overrides(nodes, gpu, None, overrides or []))
    result = plan_from_args(spec_path, nodes=nodes, gpu=gpu, overrides=overrides)
    if not result.feasible:
        raise CrucibleError(
            f"the plan for {spec_path} is not feasible ({result.problems[0]}); "
            "run `crucible plan` and fix the spec first"
        )
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:50] or "crucible"
    if not name[0].isalpha():
        name = f"c-{name}"[:50]
    out_dir.mkdir(parents=True, exist_ok=True)
    token = new_token(out_dir / f"{name}.auth_token")  # this cluster's own, never the laptop's
    opts = LaunchOptions(
        name=name,
        provider=provider,
        head_ip=head_ip,
        worker_ips=list(worker_ips or []),
        token_path=token,
        subnet=subnet,
        security_group=security_group,
        fabric=fabric,
        image=image,
        namespace=namespace,
        token_secret=token_secret,
        storage=spec.cluster.storage,
        storage_claim=storage_claim,
    )
    written = [token]
    if target == "ray-launcher":
        out = out_dir / f"{name}-ray-cluster.yaml"
        out.write_text(yaml.safe_dump(ray_launcher_config(result, opts), sort_keys=False))
        return [out, *written]
    if "://" not in spec.cluster.storage and not spec.cluster.storage.startswith("/"):
        raise CrucibleError(
            f"cluster.storage {spec.cluster.storage!r} is relative; pods need an object-store "
            "URI (s3://...) or an absolute path on the shared volume"
        )
    resolved = dump_spec(absolutize(spec))
    out = out_dir / f"{name}-kuberay.yaml"
    out.write_text(yaml.safe_dump_all(kuberay_manifests(result, opts, resolved), sort_keys=False))
    (out_dir / "Dockerfile").write_text(dockerfile())
    return [out, out_dir / "Dockerfile", *written]


def config_cmd(
    spec: Path = typer.Argument(..., help="The train spec to plan and launch."),
    target: str = typer.Option(..., "--target", help="ray-launcher or kuberay."),
    out: Path = typer.Option(Path("."), "--out", help="Directory for the written files."),
    nodes: int | None = typer.Option(None, "--nodes", help="Overrides cluster.nodes."),
    gpu: str | None = typer.Option(None, "--gpu", help="Overrides cluster.gpu."),
    provider: str = typer.Option("aws", "--provider", help="ray-launcher: aws or local."),
    head_ip: str | None = typer.Option(None, "--head-ip", help="local provider: head address."),
    worker_ip: list[str] = typer.Option([], "--worker-ip", help="local provider, per node."),
    aws_subnet: str | None = typer.Option(None, "--aws-subnet", help="AWS: the nodes' subnet."),
    aws_security_group: str | None = typer.Option(
        None, "--aws-security-group", help="AWS: a group allowing all traffic within itself."
    ),
    fabric: str | None = typer.Option(
        None, "--fabric", help="efa or infiniband (default: efa on AWS, else infiniband)."
    ),
    image: str = typer.Option(
        "", "--image", help="KubeRay image with crucible installed (default: the Dockerfile's)."
    ),
    namespace: str = typer.Option("default", "--namespace", help="Kubernetes namespace."),
    token_secret: str = typer.Option(
        "crucible-ray-token", "--token-secret", help="Secret with key auth_token."
    ),
    storage_claim: str = typer.Option(
        "crucible-storage", "--storage-claim", help="ReadWriteMany PVC, for a path storage."
    ),
    set_: list[str] = typer.Option([], "--set", help="Spec override key.path=value."),
) -> None:
    """Write a Ray cluster launcher YAML or KubeRay manifests sized from the plan."""
    paths = write_launch_config(
        spec,
        target,
        out,
        nodes=nodes,
        gpu=gpu,
        provider=provider,
        head_ip=head_ip,
        worker_ips=worker_ip,
        subnet=aws_subnet,
        security_group=aws_security_group,
        fabric=fabric,
        image=image,
        namespace=namespace,
        token_secret=token_secret,
        storage_claim=storage_claim,
        overrides=set_,
    )
    for p in paths:
        typer.echo(f"wrote {p}")
