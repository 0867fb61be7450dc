"""ray_configs/: the `ray up` cluster YAML and the KubeRay RayJob parse and hold what the job needs."""
import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.pretokenize import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "ray_configs"


def test_ray_up_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # raises on unknown / missing fields
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].split(".")[0][0] in "gp"  # AWS GPU families g*/p*
    assert gpu["min_workers"] >= 1 and gpu["max_workers"] >= gpu["min_workers"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the driver only
    assert any("torch==2.13.0" in c for c in cfg["setup_commands"])
    assert any("pip install" in c and "maskgil" in c for c in cfg["setup_commands"])


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((CONFIGS / "kuberay_pretokenize.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("pipelines/pretokenize.py")
    args = parse_args(argv[2:])  # the flags are ones the pipeline accepts
    assert args.source.startswith("s3://") and args.out.startswith("s3://") and args.format == "imagenet"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["name"] == "ray-head"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-tokenizers"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    # The tokenizer pool fits on the GPU group at full size.
    assert args.num_tokenizers * args.gpus_per_tokenizer <= gpu["maxReplicas"] * gpus_per_pod
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    # The tokenizer path is mounted wherever it is loaded (driver on the head, actors on GPU workers).
    for pod in (cluster["headGroupSpec"]["template"], gpu["template"]):
        mounts = [m["mountPath"] for m in pod["spec"]["containers"][0].get("volumeMounts", [])]
        assert any(args.tokenizer.startswith(m) for m in mounts)


def test_a_wrong_tokenizer_path_is_a_usage_error_before_ray_starts(tmp_path, capsys):
    from pipelines.pretokenize import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(tmp_path), "--format", "imagenet", "--out", str(tmp_path / "out"),
              "--tokenizer", str(tmp_path / "no_tokenizer"), "--no-mlflow"])
    assert exit_info.value.code == 2
    assert "no_tokenizer is not a checkpoint directory" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0.9", "0", "nan"])
def test_crop_range_below_one_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--source", "s", "--format", "imagenet", "--out", "o", "--tokenizer", "t",
                    "--augment", "ten-crop", "--crop-range", value])
    assert exit_info.value.code == 2
    assert "--crop-range: crop_range must be a finite number >= 1" in capsys.readouterr().err
    assert parse_args(["--source", "s", "--format", "imagenet", "--out", "o", "--tokenizer", "t", "--crop-range", "1"]).crop_range == 1.0
