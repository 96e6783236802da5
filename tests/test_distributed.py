"""The same command under torchrun (2 gloo ranks on CPU) shards the batches and merges to the
single-process result."""
import glob
import subprocess
import sys

from test_resume import command, env, rows, weights_dir


def test_two_gloo_ranks_merge_to_the_single_process_table(tmp_path, tmp_path_factory):
    weights = weights_dir(tmp_path_factory)
    single, dist = tmp_path / "single", tmp_path / "dist"
    subprocess.run(command(single, weights), env=env(), check=True, capture_output=True, timeout=300)
    cmd = command(dist, weights)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "coup_fast.cli", *cmd[3:]]
    proc = subprocess.run(torchrun, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(dist) == rows(single)
    assert "| reverse |" in proc.stdout and proc.stdout.count("| reverse |") == 1  # only rank 0 prints
    import json

    assert json.load(open(dist / "results.json"))["meta"]["world_size"] == 2
    assert len(glob.glob(str(dist / "batches" / "*" / "**" / "batch*.json"), recursive=True)) == 16
