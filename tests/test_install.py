"""The package as installed: extension built against the running torch, fallbacks honest."""
import json
import os
import subprocess
import sys

import torch

import coup_fast


def test_extension_is_built_for_this_torch_and_registered():
    info = coup_fast.backend_info()
    assert info["torch"] == torch.__version__
    # built by the README's `pip install -e .` (setup.py), not the JIT fallback that would hide a stale or missing build
    assert info["extension"] == "built (setup.py)", (info["extension"], info["extension_error"])
    assert info["cpu"] == "cpp"
    assert hasattr(torch.ops.coup_fast, "em_step") and hasattr(torch.ops.coup_fast, "adjoint_update")


def test_pure_torch_fallback_gives_the_same_purification():
    code = (
        "import json, torch, coup_fast, sys; sys.path.insert(0, 'tests'); from problems import analytic_problem;"
        "s, c = analytic_problem(); x = torch.rand(3, 6, generator=torch.Generator().manual_seed(0));"
        "out = coup_fast.purify(x, s, c, generator=torch.Generator().manual_seed(1));"
        "print(json.dumps({'cpu': coup_fast.backend_info()['cpu'], 'out': out.tolist()}))"
    )
    root = os.path.dirname(os.path.dirname(__file__))
    results = {}
    for disabled in ("0", "1"):
        env = dict(os.environ, COUP_FAST_DISABLE_EXT=disabled)
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
        results[disabled] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["0"]["cpu"] == "cpp" and results["1"]["cpu"] == "torch"
    diff = (torch.tensor(results["0"]["out"]) - torch.tensor(results["1"]["out"])).abs().max().item()
    assert diff < 1e-5
