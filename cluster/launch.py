"""Launch configurations sized from a plan: Ray's cluster launcher YAML and KubeRay manifests.

crucible schedules nothing itself. These files start a Ray cluster with the tools people
already use — ``ray up`` on VMs (AWS or on-premises machines), KubeRay on Kubernetes — with
one CPU head (``num-cpus 0``: it only coordinates) and ``plan.nodes`` GPU workers of
``plan.gpus_per_node`` GPUs each. Ray runs with token authentication; the token travels as
a file (launcher ``file_mounts``) or a Kubernetes Secret reference, never inside the config.

The same train spec that runs on the local cluster runs on these: only ``cluster.address``
(the head's dashboard URL) and ``cluster.storage`` (a path every node mounts, or s3://)
differ.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crucible
from crucible.cluster.planner import GiB, Plan
from crucible.errors import CrucibleError

TOKEN_KEY = "auth_token"
REMOTE_TOKEN = "~/.crucible/auth_token"
REMOTE_SRC = "~/crucible"
# On-demand instance types with 8 of each GPU and one NIC per GPU (EFA).
AWS_INSTANCES = {
    "a100-40gb": "p4d.24xlarge",
    "a100-80gb": "p4de.24xlarge",
    "h100-sxm": "p5.48xlarge",
    "h200": "p5en.48xlarge",
}


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how the cluster is launched (everything the plan does not decide)."""

    name: str
    provider: str = "aws"  # ray-launcher: aws or local (on-premises machines over ssh)
    region: str = "us-east-1"
    head_instance: str = "m6i.8xlarge"
    head_ip: str | None = None  # local provider
    worker_ips: list[str] = field(default_factory=list)  # local provider
    ssh_user: str = "ubuntu"
    token_path: Path | None = None  # local file with the Ray auth token (launcher)
    image: str = ""  # KubeRay container image (default: rayproject/ray:<ray>-py311-gpu)
    namespace: str = "default"
    token_secret: str = "crucible-ray-token"  # Secret with key auth_token (KubeRay)
    storage_claim: str = "crucible-storage"  # ReadWriteMany PVC shared by all pods
    storage_mount: str = "/mnt/crucible"
    cpus_per_gpu: int = 10


def _check_name(name: str) -> str:
    ok = name.replace("-", "").isalnum() and name[:1].isalpha() and name == name.lower()
    if not ok or len(name) > 50:
        raise CrucibleError(
            f"cluster name {name!r} must be lowercase letters, digits and '-', starting with "
            "a letter (it names Kubernetes objects and cloud instances)"
        )
    return name


def _worker_memory_gib(plan: Plan) -> int:
    # Room for offloaded model states (DeepSpeed's CPU estimate) plus data loading.
    return max(256, math.ceil(plan.state_cpu_bytes_per_node * 1.25 / GiB) + 64)


def _start_env() -> str:
    return f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={REMOTE_TOKEN}"


def ray_launcher_config(plan: Plan, opts: LaunchOptions) -> dict[str, Any]:
    """A ``ray up`` cluster config: a CPU head and ``plan.nodes`` GPU workers.

    Args:
        plan: the plan (GPU type, nodes, GPUs per node, CPU memory for offload).
        opts: provider, names and the local token file.

    Raises:
        CrucibleError: no token file, an unknown provider, or a GPU/provider mismatch.
    """
    name = _check_name(opts.name)
    if opts.token_path is None or not Path(opts.token_path).expanduser().is_file():
        raise CrucibleError(
            f"cluster.token_path {opts.token_path} is not a file; create a Ray auth token "
            "file (e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > token`)"
        )
    gpus = plan.gpus_per_node
    worker_resources = {"CPU": gpus * opts.cpus_per_gpu, "GPU": gpus}
    if opts.provider == "aws":
        if plan.gpu not in AWS_INSTANCES or gpus != 8:
            raise CrucibleError(
                f"cluster.gpu {plan.gpu} with {gpus} GPUs per node has no AWS instance type; "
                f"use one of {', '.join(AWS_INSTANCES)} with 8 GPUs per node, or --provider local"
            )
        provider: dict[str, Any] = {
            "type": "aws",
            "region": opts.region,
            "cache_stopped_nodes": False,
        }
        head_cfg: dict[str, Any] = {"InstanceType": opts.head_instance}
        worker_cfg: dict[str, Any] = {
            "InstanceType": AWS_INSTANCES[plan.gpu],
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 1024}}],
        }
    elif opts.provider == "local":
        if not opts.head_ip or len(opts.worker_ips) != plan.nodes:
            raise CrucibleError(
                f"the local provider needs --head-ip and exactly {plan.nodes} --worker-ip "
                f"addresses (got {len(opts.worker_ips)})"
            )
        provider = {"type": "local", "head_ip": opts.head_ip, "worker_ips": opts.worker_ips}
        head_cfg, worker_cfg = {}, {}
    else:
        raise CrucibleError(f"provider {opts.provider!r} is not supported; use aws or local")
    src = str(Path(crucible.__file__).parent)
    config = {
        "cluster_name": name,
        "max_workers": plan.nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 60,
        "provider": provider,
        "auth": {"ssh_user": opts.ssh_user},
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": head_cfg},
            "gpu_worker": {
                "min_workers": plan.nodes,
                "max_workers": plan.nodes,
                "resources": worker_resources,
                "node_config": worker_cfg,
            },
        },
        "head_node_type": "head",
        # The token file and crucible's source are copied to every node, not embedded here.
        "file_mounts": {REMOTE_TOKEN: str(Path(opts.token_path).expanduser()), REMOTE_SRC: src},
        "setup_commands": [
            f"pip install 'ray[default]=={_ray_version()}' && pip install -e {REMOTE_SRC}"
        ],
        "head_start_ray_commands": [
            "ray stop",
            f"chmod 600 {REMOTE_TOKEN}; {_start_env()} ray start --head --port=6379 "
            "--num-cpus=0 --dashboard-host=0.0.0.0 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"chmod 600 {REMOTE_TOKEN}; {_start_env()} ray start --address=$RAY_HEAD_IP:6379",
        ],
    }
    if opts.provider == "local":
        # On-premises machines: Ray detects their resources; one implicit node type.
        del config["available_node_types"], config["head_node_type"]
    return config


def _container(
    name: str, image: str, opts: LaunchOptions, resources: dict[str, Any], ports: list[int]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "env": [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": opts.token_secret, "key": TOKEN_KEY}},
            },
        ],
        "resources": {"requests": resources, "limits": resources},
        "ports": [{"containerPort": p} for p in ports],
        "volumeMounts": [
            {"name": "storage", "mountPath": opts.storage_mount},
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL and torch need a large /dev/shm
        ],
    }


def _volumes(opts: LaunchOptions) -> list[dict[str, Any]]:
    return [
        {"name": "storage", "persistentVolumeClaim": {"claimName": opts.storage_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def kuberay_manifests(plan: Plan, opts: LaunchOptions, run_dir: str) -> list[dict[str, Any]]:
    """A KubeRay ``RayCluster`` sized from the plan and a ``RayJob`` running the crucible job.

    Args:
        plan: the plan (nodes, GPUs per node, CPU memory for offload).
        opts: image, namespace, token Secret, storage claim and mount.
        run_dir: the run directory as the pods see it (on the shared storage), holding the
            resolved spec; the job's entrypoint is ``python -m crucible.jobs.entry RUN_DIR``.
    """
    name = _check_name(opts.name)
    image = opts.image or f"rayproject/ray:{_ray_version()}-py311-gpu"
    meta = {"name": name, "namespace": opts.namespace, "labels": {"app": "crucible"}}
    gpus = plan.gpus_per_node
    worker_res = {
        "cpu": str(gpus * opts.cpus_per_gpu),
        "memory": f"{_worker_memory_gib(plan)}Gi",
        "nvidia.com/gpu": str(gpus),
    }
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {
            "spec": {
                "containers": [
                    _container(
                        "ray-head", image, opts, {"cpu": "8", "memory": "32Gi"}, [6379, 8265, 10001]
                    )
                ],
                "volumes": _volumes(opts),
            }
        },
    }
    workers = {
        "groupName": "gpu-workers",
        "replicas": plan.nodes,
        "minReplicas": plan.nodes,
        "maxReplicas": plan.nodes,
        "rayStartParams": {},
        "template": {
            "spec": {
                "containers": [_container("ray-worker", image, opts, worker_res, [])],
                "volumes": _volumes(opts),
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            }
        },
    }
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": meta,
        "spec": {
            "rayVersion": _ray_version(),
            "headGroupSpec": head,
            "workerGroupSpecs": [workers],
        },
    }
    submitter = _container("ray-job-submitter", image, opts, {"cpu": "1", "memory": "2Gi"}, [])
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {**meta, "name": f"{name}-job"},
        "spec": {
            "entrypoint": f"python -m crucible.jobs.entry {shlex.quote(run_dir)}",
            "clusterSelector": {"ray.io/cluster": name},
            "submitterPodTemplate": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [submitter],
                    "volumes": _volumes(opts),
                }
            },
        },
    }
    return [cluster, job]
