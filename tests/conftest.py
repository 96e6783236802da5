import os
import sys

import pytest
import torch

# Make `tests/problems.py` importable as `problems` from every test module.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels are tested under the interpreter (CPU tensors, numpy
# simulation).  It must be chosen before triton is first imported, hence here, once per session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """The test networks are tiny: one intra-op thread avoids oversubscribing a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
