"""Launch configurations sized from a plan, that run as generated: Ray's cluster launcher YAML
(here) and KubeRay manifests (:mod:`crucible.cluster.kuberay`), with what Prometheus needs to
watch them.

crucible schedules nothing itself. These files start a Ray cluster with the tools people
already use — ``ray up`` on VMs (AWS or on-premises machines), KubeRay on Kubernetes — with
one CPU head (``num-cpus 0``: it only coordinates) and ``plan.nodes`` GPU workers of
``plan.gpus_per_node`` GPUs each, and:

- crucible on every node: the launcher installs it from a copy of this source; KubeRay pods
  run an image with crucible installed (``Dockerfile`` written beside the manifests);
- the run's storage on its URI (object storage: nothing to mount; a shared path: a volume);
- NCCL set up for the fabric the planner assumes (:data:`crucible.cluster.hardware.FABRICS`):
  EFA network cards and a cluster placement group on AWS, RDMA devices and ``IPC_LOCK`` in
  pods;
- Ray token authentication with a token made for that cluster (a new file, mode 0600, never
  the laptop's own and never inside a config), reaching pods from a Kubernetes Secret;
- Prometheus: the target registry's HTTP service discovery for crucible's exporters
  (:mod:`crucible.monitoring.discovery`) and Ray's own metrics, as a scrape config for the
  launcher's head and as the Prometheus Operator objects KubeRay documents
  (PodMonitor/ServiceMonitor) plus a ScrapeConfig for crucible's targets.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crucible
from crucible.cluster.hardware import Fabric, get_fabric
from crucible.cluster.plan import GiB, Plan
from crucible.cluster.scrape import DEFAULT_PORT, PORT_ENV
from crucible.errors import CrucibleError

TOKEN_KEY = "auth_token"
REMOTE_TOKEN = "~/.crucible/auth_token"
REMOTE_SRC = "~/crucible"
METRICS_PORT = 8080  # Ray's metrics port in KubeRay pods (KubeRay's default, named "metrics")


def ray_version() -> str:
    """The installed Ray's version (the head image and the launcher nodes run the same)."""
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
    token_path: Path | None = None  # this cluster's token file (launcher; see new_token)
    subnet: str | None = None  # AWS subnet of the GPU nodes (EFA needs an explicit one)
    security_group: str | None = None  # AWS security group allowing all traffic inside it
    placement_group: str | None = None  # AWS cluster placement group (default: <name>-pg)
    fabric: str | None = None  # efa or infiniband (default: efa on AWS, else infiniband)
    image: str = ""  # KubeRay image with crucible installed (default: crucible:<v>-ray<v>-gpu)
    namespace: str = "default"
    token_secret: str = "crucible-ray-token"  # Secret with key auth_token (KubeRay)
    rdma_resource: str = "rdma/rdma_shared_device_a"  # k8s-rdma-shared-dev-plugin's default
    storage: str = ""  # the runs' storage URI (cluster.storage)
    storage_claim: str = "crucible-storage"  # ReadWriteMany PVC, when storage is a path
    cpus_per_gpu: int = 10


def new_token(path: Path) -> Path:
    """Write a new Ray auth token for one cluster to ``path`` (mode 0600); return ``path``.

    Args:
        path: the token file to create (an existing one is kept: the cluster may use it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = path.open("x")
        path.chmod(0o600)
        with fd:
            fd.write(secrets.token_hex(32))
    return path


def check_name(name: str) -> str:
    """``name`` if it is a valid cluster name (lowercase DNS label, at most 50 characters)."""
    ok = name.replace("-", "").isalnum() and name[:1].isalpha() and name == name.lower()
    if not ok or len(name) > 50:
        raise CrucibleError(
            f"cluster name {name!r} must be lowercase letters, digits and '-', starting with "
            "a letter (it names Kubernetes objects and cloud instances)"
        )
    return name


def fabric_for(plan: Plan, opts: LaunchOptions) -> Fabric:
    """The network fabric of the nodes: the option's, else EFA on AWS and InfiniBand elsewhere."""
    kind = opts.fabric or ("efa" if opts.provider == "aws" else "infiniband")
    return get_fabric(kind, plan.gpu)


def worker_memory_gib(plan: Plan) -> int:
    """Host memory per GPU node: offloaded model states (DeepSpeed's estimate) plus data loading."""
    return max(256, math.ceil(plan.run.memory.state_cpu_bytes_per_node * 1.25 / GiB) + 64)


def _exports(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items())


def _node_env(fabric: Fabric) -> dict[str, str]:
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": REMOTE_TOKEN,
        PORT_ENV: str(DEFAULT_PORT),
        **fabric.nccl_env,
    }


def _efa_interfaces(fabric: Fabric, opts: LaunchOptions) -> list[dict[str, Any]]:
    """EFA on every network card: an EFA with IP on card 0, EFA-only on the others (the
    AWS user guide's configuration for instances with several network cards)."""
    common = {"SubnetId": opts.subnet, "Groups": [opts.security_group]}
    cards = [{"NetworkCardIndex": 0, "DeviceIndex": 0, "InterfaceType": "efa", **common}]
    cards += [
        {"NetworkCardIndex": i, "DeviceIndex": 1, "InterfaceType": "efa-only", **common}
        for i in range(1, fabric.efa_interfaces)
    ]
    return cards


def ray_launcher_config(plan: Plan, opts: LaunchOptions) -> dict[str, Any]:
    """A ``ray up`` cluster config: a CPU head and ``plan.nodes`` GPU workers.

    Args:
        plan: the plan (GPU type, nodes, GPUs per node, CPU memory for offload).
        opts: provider, names, network and this cluster's token file.

    Raises:
        CrucibleError: no token file, an unknown provider, a GPU/provider mismatch, or AWS
            without a subnet and security group.
    """
    name = check_name(opts.name)
    if opts.token_path is None or not Path(opts.token_path).expanduser().is_file():
        raise CrucibleError(
            f"token file {opts.token_path} does not exist; `crucible cluster config` makes "
            "one for the cluster"
        )
    gpus = plan.gpus_per_node
    fabric = fabric_for(plan, opts)
    worker_resources = {"CPU": gpus * opts.cpus_per_gpu, "GPU": gpus}
    if opts.provider == "aws":
        if fabric.aws_instance is None or gpus != 8:
            raise CrucibleError(
                f"cluster.gpu {plan.gpu} with {gpus} GPUs per node has no AWS instance type; "
                "use 8 GPUs per node of a100-40gb, a100-80gb, h100-sxm or h200, or "
                "--provider local"
            )
        if not opts.subnet or not opts.security_group:
            raise CrucibleError(
                "EFA needs the GPU nodes' network given: --aws-subnet subnet-... and "
                "--aws-security-group sg-... (one that allows all traffic within itself)"
            )
        provider: dict[str, Any] = {
            "type": "aws",
            "region": opts.region,
            "cache_stopped_nodes": False,
        }
        head_cfg: dict[str, Any] = {
            "InstanceType": opts.head_instance,
            "SubnetIds": [opts.subnet],
            "SecurityGroupIds": [opts.security_group],
        }
        worker_cfg: dict[str, Any] = {
            "InstanceType": fabric.aws_instance,
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 1024}}],
            "NetworkInterfaces": _efa_interfaces(fabric, opts),
            # one spine: the nodes of a cluster placement group share the EFA fabric
            "Placement": {"GroupName": opts.placement_group or f"{name}-pg"},
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
    env = _exports(_node_env(fabric))
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
        # This cluster's token file and crucible's source go to every node, not into here.
        "file_mounts": {REMOTE_TOKEN: str(Path(opts.token_path).expanduser()), REMOTE_SRC: src},
        "setup_commands": [
            f"pip install 'ray[default,data,train]=={ray_version()}' && pip install {REMOTE_SRC}"
        ],
        "head_start_ray_commands": [
            "ray stop",
            f"chmod 600 {REMOTE_TOKEN}; {env} ray start --head --port=6379 "
            "--num-cpus=0 --dashboard-host=0.0.0.0 --metrics-export-port=8080 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
            # Prometheus on the head, finding every node's targets as in scrape_config()
            "python -m crucible.monitoring.discovery --prometheus-config > "
            "~/crucible-prometheus.yml && (command -v prometheus >/dev/null && nohup "
            "prometheus --config.file=$HOME/crucible-prometheus.yml "
            "--web.listen-address=127.0.0.1:9090 >/tmp/prometheus.log 2>&1 &) || true",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"chmod 600 {REMOTE_TOKEN}; {env} ray start --address=$RAY_HEAD_IP:6379 "
            "--metrics-export-port=8080",
        ],
    }
    if opts.provider == "local":
        # On-premises machines: Ray detects their resources; one implicit node type.
        del config["available_node_types"], config["head_node_type"]
    return config
