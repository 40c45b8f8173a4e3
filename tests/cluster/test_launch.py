"""Launch configs: the Ray launcher YAML passes Ray's own validation; KubeRay manifests
parse and carry the planned resources, the token Secret reference and the job entrypoint."""

from __future__ import annotations

import copy

import pytest
import yaml

from crucible.cluster.kuberay import kuberay_manifests
from crucible.cluster.launch import LaunchOptions, ray_launcher_config
from crucible.cluster.plan import plan
from crucible.cluster.spec import ClusterSpec
from crucible.errors import CrucibleError
from crucible.jobs.cli.plan import write_launch_config
from crucible.model.presets import get_preset

TOKEN = "0123456789abcdef-secret-token"


@pytest.fixture(scope="module")
def gpt3_plan():
    return plan(
        get_preset("gpt3-175b"),
        ClusterSpec(gpu="a100-80gb", nodes=64),
        global_batch_size=1536,
        tokens=300e9,
        alternatives=False,
    )


@pytest.fixture()
def token(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text(TOKEN)
    return path


def _ray_validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


AWS_NET = {"subnet": "subnet-0a1b2c3d", "security_group": "sg-0a1b2c3d"}


def test_aws_launcher_config_passes_ray_validation(gpt3_plan, token):
    cfg = ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=token, **AWS_NET))
    _ray_validate(yaml.safe_load(yaml.safe_dump(cfg)))
    worker = cfg["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == worker["max_workers"] == cfg["max_workers"] == 64
    assert worker["resources"]["GPU"] == 8
    node = worker["node_config"]
    assert node["InstanceType"] == "p4de.24xlarge"
    # EFA on all 4 network cards of a p4de, in a cluster placement group
    assert [n["InterfaceType"] for n in node["NetworkInterfaces"]] == ["efa"] + ["efa-only"] * 3
    assert [n["NetworkCardIndex"] for n in node["NetworkInterfaces"]] == [0, 1, 2, 3]
    assert all(n["SubnetId"] == "subnet-0a1b2c3d" for n in node["NetworkInterfaces"])
    assert node["Placement"] == {"GroupName": "gpt3-pg"}
    assert cfg["file_mounts"]["~/.crucible/auth_token"] == str(token)
    assert TOKEN not in yaml.safe_dump(cfg)  # the token travels as a file, never inline
    for cmd in (cfg["head_start_ray_commands"][1], cfg["worker_start_ray_commands"][1]):
        assert "RAY_AUTH_MODE=token" in cmd and "FI_PROVIDER=efa" in cmd
        assert "FI_EFA_USE_DEVICE_RDMA=1" in cmd and "NCCL_SOCKET_IFNAME=^lo,docker0" in cmd
    assert "crucible.monitoring.discovery --prometheus-config" in cfg["head_start_ray_commands"][2]
    assert any("pip install ~/crucible" in c for c in cfg["setup_commands"])


def test_aws_launcher_needs_the_network_for_efa(gpt3_plan, token):
    with pytest.raises(CrucibleError, match="--aws-subnet"):
        ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=token))


def test_h100_nodes_get_32_efa_cards_and_h200_16(token):
    for gpu, instance, cards in (("h100-sxm", "p5.48xlarge", 32), ("h200", "p5en.48xlarge", 16)):
        p = plan(get_preset("gpt3-13b"), ClusterSpec(gpu=gpu, nodes=2), global_batch_size=64,
                 tokens=1e9, alternatives=False)  # fmt: skip
        cfg = ray_launcher_config(p, LaunchOptions(name="g", token_path=token, **AWS_NET))
        node = cfg["available_node_types"]["gpu_worker"]["node_config"]
        assert node["InstanceType"] == instance and len(node["NetworkInterfaces"]) == cards


def test_ray_validation_catches_a_broken_config(gpt3_plan, token):
    """The validation used above is real: a wrong type fails Ray's schema."""
    import jsonschema

    cfg = ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=token, **AWS_NET))
    cfg["available_node_types"]["gpu_worker"]["min_workers"] = "sixty-four"
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(cfg)


def test_on_premises_launcher_config_passes_ray_validation(gpt3_plan, token):
    ips = [f"10.0.1.{i}" for i in range(64)]
    opts = LaunchOptions(
        name="gpt3", provider="local", head_ip="10.0.0.1", worker_ips=ips, token_path=token
    )
    cfg = ray_launcher_config(gpt3_plan, opts)
    _ray_validate(cfg)
    assert cfg["provider"]["worker_ips"] == ips and cfg["max_workers"] == 64
    assert "NCCL_IB_HCA=mlx5" in cfg["worker_start_ray_commands"][1]  # InfiniBand on-premises
    with pytest.raises(CrucibleError, match="exactly 64 --worker-ip"):
        ray_launcher_config(
            gpt3_plan,
            LaunchOptions(name="gpt3", provider="local", head_ip="10.0.0.1", token_path=token),
        )


def test_launcher_needs_a_token_file_and_a_known_instance(gpt3_plan, tmp_path, token):
    with pytest.raises(CrucibleError, match="token file"):
        ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=tmp_path / "no"))
    odd = plan(
        get_preset("gpt3-1.3b"),
        ClusterSpec(gpu="a100-80gb", nodes=2, gpus_per_node=4),
        global_batch_size=64,
        tokens=1e9,
        alternatives=False,
    )
    with pytest.raises(CrucibleError, match="no AWS instance type"):
        ray_launcher_config(odd, LaunchOptions(name="gpt3", token_path=token, **AWS_NET))
    with pytest.raises(CrucibleError, match="cluster name"):
        ray_launcher_config(gpt3_plan, LaunchOptions(name="GPT_3", token_path=token))


# Fields of the Prometheus Operator CRDs the manifests use (monitoring.coreos.com v1 /
# v1alpha1 API reference: ServiceMonitorSpec, PodMonitorSpec, ScrapeConfigSpec, Endpoint,
# PodMetricsEndpoint, HTTPSDConfig). A misspelt field is silently dropped by the operator.
CRD_FIELDS = {
    "ServiceMonitor": {"spec": {"namespaceSelector", "selector", "endpoints", "targetLabels",
                                "jobLabel", "podTargetLabels", "sampleLimit"},
                       "endpoints": {"port", "path", "interval", "scheme", "relabelings",
                                     "metricRelabelings", "honorLabels", "scrapeTimeout"}},
    "PodMonitor": {"spec": {"namespaceSelector", "selector", "podMetricsEndpoints", "jobLabel",
                            "podTargetLabels", "sampleLimit"},
                   "podMetricsEndpoints": {"port", "path", "interval", "scheme", "relabelings",
                                           "metricRelabelings", "honorLabels", "scrapeTimeout"}},
    "ScrapeConfig": {"spec": {"httpSDConfigs", "staticConfigs", "fileSDConfigs", "relabelings",
                              "metricRelabelings", "scrapeInterval", "scrapeTimeout",
                              "metricsPath", "scheme", "jobName"},
                     "httpSDConfigs": {"url", "refreshInterval", "authorization", "tlsConfig",
                                       "proxyUrl", "basicAuth"}},
}  # fmt: skip


def _kuberay(gpt3_plan, **kw):
    spec_yaml = "kind: train\nname: gpt3\n"
    opts = LaunchOptions(name="gpt3", storage=kw.pop("storage", "s3://bucket/runs"), **kw)
    docs = kuberay_manifests(gpt3_plan, opts, spec_yaml)
    return list(yaml.safe_load_all(yaml.safe_dump_all(docs))), spec_yaml


def test_kuberay_manifests_carry_the_plan_the_spec_and_the_fabric(gpt3_plan):
    import base64

    docs, spec_yaml = _kuberay(gpt3_plan)
    cluster, job, smon, pmon, scrape = docs
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 64
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"].startswith("crucible:") and worker["image"].endswith("-gpu")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert worker["resources"]["requests"]["vpc.amazonaws.com/efa"] == "4"
    assert worker["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and env["FI_PROVIDER"]["value"] == "efa"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "crucible-ray-token",
        "key": "auth_token",
    }
    # object storage: nothing to mount
    assert {v["name"] for v in group["template"]["spec"]["volumes"]} == {"dshm"}
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["metrics"] == 8080 and ports["crucible-sd"] == 8269
    # the spec travels inside the RayJob: nothing needs to exist on storage beforehand
    words = job["spec"]["entrypoint"].split()
    assert words[:4] == ["python", "-m", "crucible.jobs.entry", "--spec"]
    assert base64.b64decode(words[4]).decode() == spec_yaml
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "gpt3"}
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert "RAY_AUTH_TOKEN" in {e["name"] for e in submitter["env"]}
    # what Prometheus needs: KubeRay's monitors for Ray, HTTP SD for crucible's exporters
    assert (smon["kind"], pmon["kind"], scrape["kind"]) == (
        "ServiceMonitor",
        "PodMonitor",
        "ScrapeConfig",
    )
    for obj in (smon, pmon, scrape):
        allowed = CRD_FIELDS[obj["kind"]]
        assert set(obj["spec"]) <= allowed["spec"], obj
        for key, fields in allowed.items():
            for item in obj["spec"].get(key, []) if key != "spec" else []:
                assert set(item) <= fields, (obj["kind"], item)
    assert smon["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert pmon["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]
    assert scrape["spec"]["httpSDConfigs"][0]["url"] == (
        "http://gpt3-head-svc.default.svc:8269/targets"
    )


def test_kuberay_on_infiniband_with_a_shared_path(gpt3_plan):
    docs, _ = _kuberay(gpt3_plan, fabric="infiniband", storage="/mnt/shared/runs")
    (worker,) = docs[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert {"name": "storage", "mountPath": "/mnt/shared/runs"} in worker["volumeMounts"]


def test_the_heads_prometheus_config_passes_promtool(tmp_path):
    import shutil
    import subprocess
    import sys

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    sd = tmp_path / "ray_sd.json"
    sd.write_text("[]")
    r = subprocess.run(
        [sys.executable, "-m", "crucible.monitoring.discovery", "--prometheus-config",
         "--ray-sd-file", str(sd)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (tmp_path / "p.yml").write_text(r.stdout)
    cfg = yaml.safe_load(r.stdout)
    assert cfg["scrape_configs"][0]["http_sd_configs"][0]["url"].endswith(":8269/targets")
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "p.yml")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_config_command_writes_files_from_a_spec(tmp_path):
    spec = tmp_path / "gpt3.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "name": "gpt3-175b",
                "cluster": {
                    "gpu": "a100-80gb",
                    "nodes": 64,
                    "storage": "s3://runs-bucket/runs",
                    "address": "http://head:8265",
                },
                "model": {"preset": "gpt3-175b", "parallel": {"activation_checkpointing": True}},
                "data": {"shards": "s3://runs-bucket/shards"},
                "optim": {"global_batch_size": 1536, "micro_batch_size": 1},
                "train": {"num_workers": 512, "max_tokens": 300e9},
            }
        )
    )
    out = tmp_path / "out"
    launcher, token = write_launch_config(
        spec, "ray-launcher", out, subnet="subnet-1", security_group="sg-1"
    )
    _ray_validate(yaml.safe_load(launcher.read_text()))
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    assert token.read_text() not in launcher.read_text()
    kube, dockerfile, token2 = write_launch_config(spec, "kuberay", out, nodes=96)
    assert token2 == token  # one cluster, one token
    cluster, job, *_ = yaml.safe_load_all(kube.read_text())
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 96
    assert "FROM rayproject/ray:" in dockerfile.read_text()
    import base64

    shipped = yaml.safe_load(base64.b64decode(job["spec"]["entrypoint"].split()[4]))
    assert (
        shipped["name"] == "gpt3-175b" and shipped["cluster"]["storage"] == "s3://runs-bucket/runs"
    )
    with pytest.raises(CrucibleError, match="not feasible .*not divisible"):
        write_launch_config(spec, "kuberay", out, nodes=128)
    with pytest.raises(CrucibleError, match="--target"):
        write_launch_config(spec, "slurm", out)


def test_a_shipped_spec_prepares_its_run_where_the_job_runs(tmp_path):
    """The RayJob's entrypoint: the spec comes with the job, the run directory is made on
    the cluster; errors stay one line."""
    import base64
    import subprocess
    import sys

    spec = {
        "kind": "train", "name": "shipped", "cluster": {"storage": str(tmp_path / "runs")},
        "model": {"preset": "tiny"}, "data": {"shards": str(tmp_path / "no-shards")},
        "train": {"num_workers": 1, "max_steps": 1},
    }  # fmt: skip
    blob = base64.b64encode(yaml.safe_dump(spec).encode()).decode()
    entry = [sys.executable, "-m", "crucible.jobs.entry"]
    r = subprocess.run([*entry, "--spec", blob], capture_output=True, text=True)
    assert r.returncode == 2 and "no-shards does not exist" in r.stderr, r.stderr
    resolved = yaml.safe_load((tmp_path / "runs" / "shipped" / "spec.resolved.yaml").read_text())
    assert resolved["data"]["shards"] == str(tmp_path / "no-shards")
    r = subprocess.run([*entry, "--spec", "not base64!"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: the job's --spec is not base64")
