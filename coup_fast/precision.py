"""Precision and layout knobs for the networks; the SDE state and the adjoint stay fp32 always.

Knobs (`Precision`):
- compute='fp32': IEEE fp32 matmuls and convolutions (cuDNN's default TF32 for convs is turned off).
- compute='tf32': fp32 tensors, TF32 tensor-core matmuls/convs (10-bit mantissa products).
- compute='bf16': the networks run under torch.autocast(bfloat16); their outputs are cast back to fp32.
- channels_last: NHWC activations and weights (faster convs on tensor cores).
- compile_networks: torch.compile the networks alone (no double backward: exact gradients with lam > 0
  need eager nets).  Not engine='compile', which compiles the whole step with torch.func, double
  backward included.

TF32 is a global backend flag that cuDNN reads when a kernel runs, including the backward
kernels autograd launches outside the network's forward, so wrap the whole purification
(or attack step) in `precision_context`; `prepare` wraps the networks themselves.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

COMPUTE = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Precision:
    """How the networks compute; see the module docstring."""

    compute: str = "fp32"
    channels_last: bool = False
    compile_networks: bool = False

    def __post_init__(self):
        if self.compute not in COMPUTE:
            raise ValueError(f"compute: expected one of {COMPUTE}, got {self.compute!r}")

    @property
    def name(self) -> str:
        return "+".join([self.compute] + ["channels_last"] * self.channels_last + ["compile"] * self.compile_networks)


def backend_flags() -> tuple:
    """The global flags a captured graph bakes in: TF32, cuDNN use and algorithm choice, deterministic
    algorithms, attention backends, CUDA autocast."""
    try:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # torch >= 2.9 refuses the legacy getters after an inconsistent mix of APIs
        tf32 = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    cudnn = (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    cuda = torch.backends.cuda
    sdp = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
           cuda.cudnn_sdp_enabled())  # which attention kernel (NCSN++) gets recorded
    return tf32, cudnn, sdp, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


@contextlib.contextmanager
def _tf32(enabled: bool):
    # The legacy setters keep torch >= 2.9's per-backend fp32_precision consistent with them, so
    # code reading either API (inductor reads the legacy one) keeps working.
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = matmul.allow_tf32, conv.allow_tf32
    except RuntimeError:  # the user set the per-backend API in a way the legacy getters refuse (torch >= 2.9)
        saved = None
        saved_precision = matmul.fp32_precision, conv.conv.fp32_precision
    matmul.allow_tf32 = conv.allow_tf32 = enabled
    try:
        yield
    finally:
        if saved is not None:
            matmul.allow_tf32, conv.allow_tf32 = saved
        else:
            matmul.fp32_precision, conv.conv.fp32_precision = saved_precision


@contextlib.contextmanager
def precision_context(precision: Precision, device_type: str = "cuda"):
    """TF32 off (fp32) or on (tf32), or bf16 autocast, for everything run inside."""
    if precision.compute == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    else:
        with _tf32(precision.compute == "tf32"):
            yield


class PrecisionNet(nn.Module):
    """net(x, *args) under a precision knob; fp32 in, fp32 out (x's dtype, contiguous)."""

    def __init__(self, net, precision: Precision):
        super().__init__()
        self.net, self.precision = net, precision
        self.run = torch.compile(net) if precision.compile_networks else net

    def forward(self, x, *args):
        dtype = x.dtype
        if self.precision.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision_context(self.precision, x.device.type):
            out = self.run(x, *args)
        return out.to(dtype).contiguous()


# relative round-off of one product in each compute mode: bf16's 8-bit and TF32's 11-bit significands
ROUNDING = {"fp32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}


def network_rounding(*nets) -> float:
    """The largest relative round-off that the precision knobs of these networks (PrecisionNet wrappers from
    `prepare`) add to their products: 0 for plain (fp32) networks.  Checks that compare two ways of
    computing the same network maths (e.g. compiled against eager) scale their tolerance by it."""
    knobs = [net.precision.compute for net in nets if isinstance(net, PrecisionNet)]
    return max((ROUNDING[k] for k in knobs), default=0.0)


def prepare(net, precision: Precision):
    """`net` wrapped for `precision`; a channels_last copy when asked (the caller's net is untouched)."""
    if precision == Precision():
        return net
    if precision.channels_last and isinstance(net, nn.Module):
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    return PrecisionNet(net, precision)
