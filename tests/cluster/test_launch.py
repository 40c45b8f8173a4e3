"""Launch configs: the Ray launcher YAML passes Ray's own validation; KubeRay manifests
parse and carry the planned resources, the token Secret reference and the job entrypoint."""

from __future__ import annotations

import copy

import pytest
import yaml

from crucible.cluster.launch import LaunchOptions, kuberay_manifests, ray_launcher_config
from crucible.cluster.planner import plan
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


def test_aws_launcher_config_passes_ray_validation(gpt3_plan, token):
    cfg = ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=token))
    _ray_validate(yaml.safe_load(yaml.safe_dump(cfg)))
    worker = cfg["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == worker["max_workers"] == cfg["max_workers"] == 64
    assert worker["resources"]["GPU"] == 8
    assert worker["node_config"]["InstanceType"] == "p4de.24xlarge"
    assert cfg["file_mounts"]["~/.crucible/auth_token"] == str(token)
    assert TOKEN not in yaml.safe_dump(cfg)  # the token travels as a file, never inline
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"][1:])


def test_ray_validation_catches_a_broken_config(gpt3_plan, token):
    """The validation used above is real: a wrong type fails Ray's schema."""
    import jsonschema

    cfg = ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=token))
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
    with pytest.raises(CrucibleError, match="exactly 64 --worker-ip"):
        ray_launcher_config(
            gpt3_plan,
            LaunchOptions(name="gpt3", provider="local", head_ip="10.0.0.1", token_path=token),
        )


def test_launcher_needs_a_token_file_and_a_known_instance(gpt3_plan, tmp_path, token):
    with pytest.raises(CrucibleError, match="token_path"):
        ray_launcher_config(gpt3_plan, LaunchOptions(name="gpt3", token_path=tmp_path / "no"))
    odd = plan(
        get_preset("gpt3-1.3b"),
        ClusterSpec(gpu="a100-80gb", nodes=2, gpus_per_node=4),
        global_batch_size=64,
        tokens=1e9,
        alternatives=False,
    )
    with pytest.raises(CrucibleError, match="no AWS instance type"):
        ray_launcher_config(odd, LaunchOptions(name="gpt3", token_path=token))
    with pytest.raises(CrucibleError, match="cluster name"):
        ray_launcher_config(gpt3_plan, LaunchOptions(name="GPT_3", token_path=token))


def test_kuberay_manifests_carry_the_plan(gpt3_plan):
    docs = list(
        yaml.safe_load_all(
            yaml.safe_dump_all(
                kuberay_manifests(gpt3_plan, LaunchOptions(name="gpt3"), "/mnt/crucible/gpt3")
            )
        )
    )
    cluster, job = docs
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 64
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in worker["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "crucible-ray-token",
        "key": "auth_token",
    }
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "crucible-storage"
    assert {"name": "storage", "mountPath": "/mnt/crucible"} in worker["volumeMounts"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert (job["kind"], job["spec"]["entrypoint"]) == (
        "RayJob",
        "python -m crucible.jobs.entry /mnt/crucible/gpt3",
    )
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "gpt3"}
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert "RAY_AUTH_TOKEN" in {e["name"] for e in submitter["env"]}


def test_config_command_writes_files_from_a_spec(tmp_path, token):
    spec = tmp_path / "gpt3.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "name": "gpt3-175b",
                "cluster": {
                    "gpu": "a100-80gb",
                    "nodes": 64,
                    "storage": "/mnt/shared/runs",
                    "token_path": str(token),
                    "address": "http://head:8265",
                },
                "model": {"preset": "gpt3-175b", "parallel": {"activation_checkpointing": True}},
                "data": {"shards": "/mnt/shared/shards"},
                "optim": {"global_batch_size": 1536, "micro_batch_size": 1},
                "train": {"num_workers": 512, "max_tokens": 300e9},
            }
        )
    )
    launcher = write_launch_config(spec, "ray-launcher", tmp_path / "out")
    _ray_validate(yaml.safe_load(launcher.read_text()))
    kube = write_launch_config(spec, "kuberay", tmp_path / "out", nodes=96)
    cluster, job = yaml.safe_load_all(kube.read_text())
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 96
    assert job["spec"]["entrypoint"].endswith(" /mnt/shared/runs/gpt3-175b")
    with pytest.raises(CrucibleError, match="not feasible .*not divisible"):
        write_launch_config(spec, "kuberay", tmp_path / "out", nodes=128)
    with pytest.raises(CrucibleError, match="--target"):
        write_launch_config(spec, "slurm", tmp_path / "out")
