"""WideResNet classifiers for CIFAR-10 in RobustBench's state-dict formats.

Two layouts, re-implemented so that RobustBench checkpoints load strictly:

- ``"robustbench"``: RobustBench's ``WideResNet`` (Zagoruyko & Komodakis), e.g.
  WRN-28-10 "Standard" (36.5M parameters).  Keys: ``conv1``, ``block{1,2,3}.layer.N.
  {bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.  No input normalisation.
- ``"dm"``: DeepMind's ``DMWideResNet`` (Gowal et al. 2020, Rebuffi et al. 2021,
  Wang et al. 2023), e.g. WRN-70-16 (266.8M parameters).  Keys: ``mean``, ``std``
  (normalisation buffers), ``init_conv``, ``layer.{0,1,2}.block.N.{batchnorm_0,conv_0,
  batchnorm_1,conv_1,shortcut}``, ``batchnorm``, ``logits``.  "SAME" padding done by
  hand (asymmetric (0,1,0,1) for stride 2), as in the TF original.  The released
  WRN-70-16 models use Swish (= SiLU) activations; older files lack the mean/std
  buffers, in which case the CIFAR-10 statistics are used.

Both take images in **[0, 1]**, (B, 3, 32, 32), and return logits (B, num_classes).
"""
from __future__ import annotations

import os

import torch
from torch import nn
import torch.nn.functional as F

from .._files import load_weights_file

__all__ = ["WideResNet", "DMWideResNet", "load_wideresnet", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)  # DeepMind's CIFAR-100 models normalise with these
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


# --------------------------------------------------------------------------- RobustBench
class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, 1x1 conv shortcut
    when the width changes (it then takes the pre-activated input, as in the original)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return (x if self.equal_in_out else self.convShortcut(a)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """RobustBench ``WideResNet``: u (B, 3, 32, 32) in [0, 1] -> logits (B, num_classes)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=False)
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]

    def forward(self, u):
        out = self.block3(self.block2(self.block1(self.conv1(u))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 8) at 32x32 input
        return self.fc(out)


# --------------------------------------------------------------------------- DeepMind
class _Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) \
            if self.has_shortcut else None
        self.stride = stride

    def forward(self, x):
        a = self.relu_0(self.batchnorm_0(x))
        # TF "SAME" padding: symmetric for stride 1, bottom/right only for stride 2.
        v = F.pad(a, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(a) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, act):
        super().__init__()
        self.block = nn.Sequential(*[_Block(in_planes if i == 0 else out_planes, out_planes,
                                            stride if i == 0 else 1, act) for i in range(n)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    """DeepMind ``DMWideResNet``: u (B, 3, 32, 32) in [0, 1] -> logits (B, num_classes).

    Normalises with the ``mean``/``std`` buffers (CIFAR-10 statistics by default).
    """

    def __init__(self, depth: int = 70, width: int = 16, num_classes: int = 10,
                 activation: str = "silu", mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        act = _ACTIVATIONS[activation]
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        self.init_conv = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(_BlockGroup(n, ch[0], ch[1], 1, act),
                                   _BlockGroup(n, ch[1], ch[2], 2, act),
                                   _BlockGroup(n, ch[2], ch[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = act()
        self.logits = nn.Linear(ch[3], num_classes)

    def forward(self, u):
        out = self.init_conv((u - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- loading
def _read_state_dict(path) -> dict:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    obj = load_weights_file(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict' / "
                         "'model_state_dict') of tensors")
    return obj


def load_wideresnet(path, depth: int = 28, widen: int = 10, device="cpu",
                    layout: str | None = None, activation: str | None = None,
                    num_classes: int = 10) -> nn.Module:
    """Load a RobustBench-format CIFAR WideResNet checkpoint.

    Args:
        path: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``: a raw state
            dict or a dict holding it under ``state_dict``/``model_state_dict``) or
            ``.safetensors``.  A ``module.`` prefix (DataParallel) is stripped.
        depth, widen: 28/10 (WideResNet-28-10) or 70/16 (WideResNet-70-16), etc.
        layout: "robustbench" or "dm"; default "dm" for depth 70, else "robustbench".
        activation: for the "dm" layout, "silu" (= Swish, the default, the released
            WRN-70-16s) or "relu".
    Returns:
        The classifier in eval mode: u (B, 3, 32, 32) in [0, 1] -> logits.
    Raises:
        ValueError: keys or shapes do not match the expected architecture.
    """
    layout = layout or ("dm" if depth == 70 else "robustbench")
    if layout not in ("robustbench", "dm"):
        raise ValueError(f"layout must be 'robustbench' or 'dm', got {layout!r}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v
          for k, v in _read_state_dict(path).items()}
    # Build on the meta device (instant even for 267M parameters), then assign the tensors.
    with torch.device("meta"):
        if layout == "robustbench":
            model = WideResNet(depth, widen, num_classes)
        else:
            model = DMWideResNet(depth, widen, num_classes, activation=activation or "silu")
    arch = (f"RobustBench WideResNet-{depth}-{widen}" if layout == "robustbench"
            else f"DeepMind DMWideResNet-{depth}-{widen}")
    expected = model.state_dict()
    # Tolerated absences: older DeepMind files predate the mean/std buffers (use the data
    # set's statistics), and pre-1.0 PyTorch files lack BatchNorm's batch counter.
    if layout == "dm":
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
        sd.setdefault("mean", torch.tensor(mean).view(3, 1, 1))
        sd.setdefault("std", torch.tensor(std).view(3, 1, 1))
    for k in expected:
        if k.endswith("num_batches_tracked"):
            sd.setdefault(k, torch.tensor(0))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a {arch} state dict: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
    bad = [k for k in sd if sd[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {arch}: {bad[0]} is "
                         f"{tuple(sd[bad[0]].shape)} in the file, {tuple(expected[bad[0]].shape)} "
                         f"in the model ({len(bad)} mismatched tensors)")
    sd = {k: (v if k.endswith("num_batches_tracked") else v.float()) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()
