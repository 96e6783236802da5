"""The same command under torchrun (2 gloo ranks on CPU) shards the batches and merges to the
single-process result; the process group and GPU each rank picks."""
import glob
import json
import subprocess
import sys

import pytest
import torch

from coup_fast.cli import ConfigError, EvalConfig, _device, _init_distributed
from test_resume import command, env, rows, weights_dir


def test_two_gloo_ranks_merge_to_the_single_process_table(tmp_path, tmp_path_factory):
    weights = weights_dir(tmp_path_factory)
    single, dist = tmp_path / "single", tmp_path / "dist"
    subprocess.run(command(single, weights), env=env(), check=True, capture_output=True, timeout=300)
    cmd = command(dist, weights)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "coup_fast.cli", *cmd[3:], "--device", "cpu"]  # gloo on the CPU, also on a one-GPU machine
    proc = subprocess.run(torchrun, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(dist) == rows(single)
    headline = "| **reverse** | Linf |"  # the headline row of the table
    assert headline in proc.stdout and proc.stdout.count(headline) == 1  # only rank 0 prints
    with open(dist / "samples.csv") as f, open(single / "samples.csv") as g:
        assert f.read() == g.read()
    assert json.load(open(dist / "results.json"))["meta"]["world_size"] == 2
    assert len(glob.glob(str(dist / "batches" / "*" / "**" / "batch*.json"), recursive=True)) == 16


def _fake_torchrun(monkeypatch, local_rank, gpus):
    """torchrun's variables for a 2-process job, torch seeing `gpus` GPUs, and the process group
    recorded instead of joined."""
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    return joined


def test_cpu_run_on_a_gpu_machine_joins_with_gloo(monkeypatch):
    """The backend follows the run's device: NCCL cannot reduce the CPU tensors of --device cpu."""
    joined = _fake_torchrun(monkeypatch, local_rank=1, gpus=1)
    assert _init_distributed(torch.device("cpu")) and joined == ["gloo"]


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    _fake_torchrun(monkeypatch, local_rank=1, gpus=1)
    with pytest.raises(ConfigError, match=r"^--device: torchrun's local rank 1 has no GPU.*--nproc_per_node"):
        _device(EvalConfig())
    with pytest.raises(ConfigError, match=r"^--device: torchrun's local rank 1 has no GPU"):
        _init_distributed(torch.device("cuda"))
    joined = _fake_torchrun(monkeypatch, local_rank=1, gpus=2)
    assert _device(EvalConfig()) == torch.device("cuda", 1)
    assert _init_distributed(torch.device("cuda")) and joined == [("set_device", 1), "nccl"]
