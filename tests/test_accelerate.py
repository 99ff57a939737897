"""The accelerate configs load, the single-process ones train on the CPU, and results gathered
from several processes hold every sample exactly once."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY_CONFIG, make_dataset_zip

CONFIGS = sorted((ROOT / "config" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "no"  # precision comes from our config


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["cpu", "auto", "gpu"])
def test_single_process_configs_train_on_cpu(tmp_path, name):
    from imgembed.config import load_config
    from imgembed.unpack import unpack_dataset

    cfg = load_config([ROOT / "config" / "config.yaml", TINY_CONFIG])
    unpack_dataset(make_dataset_zip(tmp_path / "d.zip", classes=3, per_split={"train": 6, "val": 3, "test": 3}),
                   tmp_path / "d", cfg["unpack"])
    override = tmp_path / "one_epoch.yaml"
    override.write_text("train: {epochs: 1}\n")
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "config" / "accelerate" / f"{name}.yaml"),
           "-m", "imgembed", "train", str(tmp_path / "d"), "-o", str(tmp_path / "m"), "--live-dir",
           str(tmp_path / "live"), "--configfile", str(ROOT / "config" / "config.yaml"), str(TINY_CONFIG), str(override)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "embedding_net.pt").is_file()
    assert "on cpu x1" in result.stderr


@pytest.mark.e2e
def test_gather_across_two_processes_keeps_every_sample_once():
    # Two CPU processes (gloo): 11 items in batches of 3 make the sampler pad the last batch.
    cmd = ["torchrun", "--nproc_per_node", "2", str(Path(__file__).parent / "scripts" / "gather_check.py"), "11"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK 2 processes, 11 items" in result.stdout
