"""Outputs and gradients stay bitwise what they were: fixed-seed digests recorded before a refactor.

    python tests/test_bitwise.py --record   # (re)write tests/digests.json for this machine's environment

A digest is the SHA-256 of the output's and the gradient's bytes.  Bits depend on the torch build, the
CPU's vector ISA (oneDNN picks kernels by it) and which backend runs the fused ops, so digests are kept
per environment; an environment with none recorded skips with the reason.  Record only on a tree whose
numbers you trust (the digests of commit `RECORDED_AT` were recorded before the layering refactor of
issue 19); a change that alters numbers on purpose re-records and says so in its commit.  A case with no digest
for this environment skips with the reason: the `adjoint` cases changed on purpose in issue 24 (the published
attack moved from torchsde to coup_fast's solver, on its own Brownian path) and are recorded only for the
environments that ran it since.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# `python tests/test_bitwise.py --record` records this tree's numbers, not an installed coup_fast's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from problems import analytic_problem, neural_problem  # noqa: E402

import coup_fast  # noqa: E402
from coup_fast import purify  # noqa: E402

DIGESTS = os.path.join(os.path.dirname(__file__), "digests.json")
RECORDED_AT = "the tree of commit 'issue 15: ...' (before issue 19's restructure)"

CASES = [(problem, mode, gradient, memory)
         for problem in ("analytic64", "neural32", "neural64")
         for mode in ("coup", "reverse", "diffpure")
         for gradient in ("exact", "detached-guidance", "bpda", "adjoint")
         for memory in (("lean", "fast") if gradient in ("exact", "detached-guidance") else ("lean",))]
# 'diffpure' above runs clamped (clamp=True, COUP's fork), as every case did when the digests were recorded, so
# they keep guarding the solver; DiffPure's default since issue 26 (unclamped, as NVlabs runs it) is its own case.
CASES += [(problem, "diffpure-unclamped", gradient, "lean") for problem in ("analytic64", "neural32", "neural64")
          for gradient in ("exact", "bpda", "adjoint")]


def _cpu_model() -> str:
    """The CPU's vendor and model (/proc/cpuinfo): oneDNN picks convolution kernels by microarchitecture, not only
    by ISA, so an AMD EPYC and an Intel Xeon with the same AVX-512 give different bits for the same float32 or
    float64 convolution.  Digests recorded before the model was part of the key were recorded on an AMD EPYC."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    vendor, model = fields.get("vendor_id", "unknown vendor"), fields.get("model name", "unknown model")
    return vendor if vendor == "AuthenticAMD" else f"{vendor} {model}"


def environment() -> str:
    return (f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, "
            f"ops {coup_fast.backend_info()['cpu']}, {_cpu_model()}")


def run_case(problem: str, mode: str, gradient: str, memory: str) -> str:
    torch.manual_seed(0)
    if problem == "analytic64":
        score, clf = analytic_problem(d=6, dtype=torch.float64)
        x = torch.rand(3, 6, dtype=torch.float64)
    else:
        dtype = torch.float64 if problem == "neural64" else torch.float32
        score, clf = neural_problem(dtype)
        x = torch.rand(2, 1, 4, 4, dtype=dtype)
    # the unclamped DiffPure case starts from pixels 0 and 1 (as digits' are), so that its images leave [0, 1]
    x = (x.round() if mode == "diffpure-unclamped" else 0.1 + 0.8 * x).requires_grad_(True)
    w = torch.randn(x.shape, dtype=x.dtype)
    clamp = {"diffpure": True, "diffpure-unclamped": False}.get(mode)  # None: the mode's default (clamped)
    out = purify(x, score, clf, t_star=0.02, dt=0.004, lam=1.5, mode=mode.partition("-")[0], gradient=gradient,
                 memory=memory, engine="eager", generator=torch.Generator().manual_seed(7), clamp=clamp)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    digest = hashlib.sha256(out.detach().numpy().tobytes() + grad.numpy().tobytes()).hexdigest()
    return digest[:24]


def _recorded() -> dict:
    if not os.path.exists(DIGESTS):
        return {}
    with open(DIGESTS) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_outputs_and_gradients_are_bitwise_as_recorded(case):
    recorded = _recorded().get(environment())
    if recorded is None:
        pytest.skip(f"no digests recorded for this environment ({environment()}); "
                    f"recorded: {sorted(_recorded())}")
    key = "/".join(case)
    if key not in recorded:
        pytest.skip(f"{key}: no digest recorded for this environment ({environment()}); record it with --record "
                    "on a tree whose numbers you trust")
    assert run_case(*case) == recorded[key], f"{key}: output or gradient bits changed"


if __name__ == "__main__":
    if "--record" in sys.argv:
        torch.set_num_threads(1)
        all_digests = _recorded()
        all_digests[environment()] = {"/".join(c): run_case(*c) for c in CASES}
        with open(DIGESTS, "w") as f:
            json.dump(all_digests, f, indent=1, sort_keys=True)
        print(f"recorded {len(CASES)} digests for {environment()}")
