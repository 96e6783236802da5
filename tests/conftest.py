import os
import sys

import torch

# Make `tests/problems.py` importable as `problems` from every test module.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels are tested under the interpreter (CPU tensors, numpy
# simulation).  It must be chosen before triton is first imported, hence here, once per session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
