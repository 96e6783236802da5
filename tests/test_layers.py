"""The package's layers import one way (docs/design.md §4): no cycles, no upward imports, no imports of
coup_fast modules hidden in functions, and every module imports on its own in a fresh interpreter."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import import_graph

# Lowest first; a module may import modules of its own layer or below only.  Modules not listed are
# applications on top (evaluation, attacks, CLI, training, the paper's analyses).
LAYERS = [
    ["coup_fast.sde", "coup_fast.noise", "coup_fast.guidance", "coup_fast.score", "coup_fast.precision",
     "coup_fast.kinks", "coup_fast.analytic", "coup_fast._files"],
    ["coup_fast.kernels", "coup_fast.kernels.em_step", "coup_fast.kernels.adjoint_update", "coup_fast.kernels.confidence",
     "coup_fast.extension", "coup_fast.ops"],
    ["coup_fast.networks", "coup_fast.lm", "coup_fast.solver", "coup_fast.adjoint", "coup_fast.published"],
    ["coup_fast.engines", "coup_fast.engines.eager", "coup_fast.engines.graph", "coup_fast.engines.compiled",
     "coup_fast.engines.torchsde", "coup_fast.reference"],
    ["coup_fast.purify", "coup_fast"],
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# Imports of coup_fast modules allowed inside functions: the Triton kernels (they import triton, an
# optional dependency that needs a GPU) and the compiled extension.
LAZY_OK = ("coup_fast.kernels.",)


def test_no_import_cycles():
    assert import_graph.cycles(import_graph.edges()) == []


def test_imports_point_down_the_layers():
    graph = import_graph.edges()
    upward = [(m, d) for m, deps in graph.items() if m in LAYER_OF
              for d in deps if d in LAYER_OF and LAYER_OF[d] > LAYER_OF[m]]
    assert upward == [], "modules importing a higher layer"
    # the reference paths are an oracle beside the solver: never the API
    assert not {"coup_fast.purify", "coup_fast"} & set(graph["coup_fast.reference"])


def test_no_coup_fast_module_is_imported_inside_a_function():
    graph = import_graph.edges()
    lazy = [(m, d) for m, deps in graph.items() for d, inside in deps.items()
            if inside and not d.startswith(LAZY_OK)]
    assert lazy == []


def _import_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return module, proc.returncode, proc.stderr[-800:]


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = sorted(m for m in import_graph.modules() if not m.startswith("coup_fast.kernels."))
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [r for r in pool.map(_import_alone, modules) if r[1] != 0]
    assert failed == []
