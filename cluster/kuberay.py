"""KubeRay manifests sized from a plan: a ``RayCluster``, a ``RayJob`` that runs the spec it
carries, the Prometheus Operator objects that scrape Ray's and crucible's metrics, and the
Dockerfile of the image the pods run (see :mod:`crucible.cluster.launch` for what every
generated cluster gets)."""

from __future__ import annotations

import base64
from typing import Any

import crucible
from crucible.cluster.launch import (
    METRICS_PORT,
    TOKEN_KEY,
    LaunchOptions,
    check_name,
    fabric_for,
    ray_version,
    worker_memory_gib,
)
from crucible.cluster.plan import Plan
from crucible.cluster.scrape import DEFAULT_PORT, PATH, PORT_ENV


def _container(
    name: str,
    image: str,
    opts: LaunchOptions,
    resources: dict[str, Any],
    ports: list[tuple[str, int]],
    env: dict[str, str],
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": opts.token_secret, "key": TOKEN_KEY}},
            },
            *({"name": k, "value": v} for k, v in env.items()),
        ],
        "resources": {"requests": resources, "limits": resources},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],  # NCCL needs /dev/shm
    }
    if not opts.storage or "://" not in opts.storage:  # a shared path: the PVC holds it
        c["volumeMounts"].append({"name": "storage", "mountPath": opts.storage or "/mnt/runs"})
    return c


def _volumes(opts: LaunchOptions) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if not opts.storage or "://" not in opts.storage:
        vols.append({"name": "storage", "persistentVolumeClaim": {"claimName": opts.storage_claim}})
    return vols


def default_image() -> str:
    """The image name the generated Dockerfile builds (crucible's and Ray's versions)."""
    return f"crucible:{crucible.__version__}-ray{ray_version()}-gpu"


def dockerfile() -> str:
    """A Dockerfile for the pods: Ray's GPU image with crucible (a wheel built from this
    source) and DeepSpeed's FusedAdam built in."""
    return (
        f"# Build: pip wheel --no-deps -w . <crucible source>; docker build -t {default_image()} .\n"
        f"FROM rayproject/ray:{ray_version()}-py311-gpu\n"
        "COPY crucible-*.whl /tmp/\n"
        "RUN DS_BUILD_FUSED_ADAM=1 pip install --no-cache-dir /tmp/crucible-*.whl "
        "&& rm /tmp/crucible-*.whl\n"
    )


def kuberay_manifests(
    plan: Plan, opts: LaunchOptions, spec_yaml: str, resume: bool = False
) -> list[dict[str, Any]]:
    """A KubeRay ``RayCluster`` sized from the plan, a ``RayJob`` that runs the spec it carries,
    and the Prometheus Operator objects that scrape Ray's and crucible's metrics.

    Args:
        plan: the plan (nodes, GPUs per node, CPU memory for offload).
        opts: image, namespace, token Secret, storage, fabric.
        spec_yaml: the resolved spec the job runs (shipped inside the RayJob).
        resume: the job resumes the run instead of starting it.
    """
    name = check_name(opts.name)
    image = opts.image or default_image()
    meta = {"name": name, "namespace": opts.namespace, "labels": {"app": "crucible"}}
    gpus = plan.gpus_per_node
    fabric = fabric_for(plan, opts)
    worker_res: dict[str, str] = {
        "cpu": str(gpus * opts.cpus_per_gpu),
        "memory": f"{worker_memory_gib(plan)}Gi",
        "nvidia.com/gpu": str(gpus),
    }
    if fabric.name == "efa":  # the EFA device plugin's resource
        worker_res["vpc.amazonaws.com/efa"] = str(fabric.efa_interfaces)
    else:
        worker_res[opts.rdma_resource] = "1"
    env = {PORT_ENV: str(DEFAULT_PORT), **fabric.nccl_env}
    head_container = _container(
        "ray-head", image, opts, {"cpu": "8", "memory": "32Gi"},
        [("gcs-server", 6379), ("dashboard", 8265), ("metrics", METRICS_PORT),
         ("crucible-sd", DEFAULT_PORT)],
        env,
    )  # fmt: skip
    worker_container = _container(
        "ray-worker", image, opts, worker_res, [("metrics", METRICS_PORT)], env
    )
    # RDMA needs locked memory; NCCL's RDMA does not work within memory limits without it.
    worker_container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    head = {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            "num-cpus": "0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {"spec": {"containers": [head_container], "volumes": _volumes(opts)}},
    }
    workers = {
        "groupName": "gpu-workers",
        "replicas": plan.nodes,
        "minReplicas": plan.nodes,
        "maxReplicas": plan.nodes,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {
            "spec": {
                "containers": [worker_container],
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
            "rayVersion": ray_version(),
            "headGroupSpec": head,
            "workerGroupSpecs": [workers],
        },
    }
    submitter = _container("ray-job-submitter", image, opts, {"cpu": "1", "memory": "2Gi"}, [], {})
    blob = base64.b64encode(spec_yaml.encode()).decode()
    entry = "python -m crucible.jobs.entry --spec " + blob + (" --resume" if resume else "")
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {**meta, "name": f"{name}-job"},
        "spec": {
            "entrypoint": entry,
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
    return [cluster, job, *prometheus_operator_objects(name, opts.namespace)]


def prometheus_operator_objects(name: str, namespace: str) -> list[dict[str, Any]]:
    """What a Prometheus Operator needs to watch the cluster: KubeRay's documented
    ServiceMonitor (head) and PodMonitor (workers) for Ray's metrics port, and a ScrapeConfig
    reading crucible's targets from the head's registry (HTTP service discovery).

    Args:
        name: the RayCluster's name.
        namespace: its namespace.
    """
    labels = {"release": "prometheus"}  # what kube-prometheus-stack selects by default
    node = {"ray.io/cluster": name}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": f"{name}-ray-head", "namespace": namespace, "labels": labels},
            "spec": {
                "namespaceSelector": {"matchNames": [namespace]},
                "selector": {"matchLabels": {**node, "ray.io/node-type": "head"}},
                "endpoints": [{"port": "metrics", "path": "/metrics"}],
                "targetLabels": ["ray.io/cluster"],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": f"{name}-ray-workers", "namespace": namespace, "labels": labels},
            "spec": {
                "namespaceSelector": {"matchNames": [namespace]},
                "selector": {"matchLabels": {**node, "ray.io/node-type": "worker"}},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1alpha1",
            "kind": "ScrapeConfig",
            "metadata": {"name": f"{name}-crucible", "namespace": namespace, "labels": labels},
            "spec": {
                "httpSDConfigs": [
                    {
                        "url": f"http://{name}-head-svc.{namespace}.svc:{DEFAULT_PORT}{PATH}",
                        "refreshInterval": "15s",
                    }
                ],
                "scrapeInterval": "15s",
            },
        },
    ]
