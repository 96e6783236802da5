"""WideResNet classifiers for CIFAR in the state-dict formats they are published in.

Three layouts, re-implemented so that the published checkpoints load strictly.  Two key
families exist; the loader detects the family from the keys:

- TRADES / Zagoruyko-Komodakis keys: ``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,
  convShortcut}``, ``bn1``, ``fc``.  Two layouts share them and differ only in normalisation:

  - ``"robustbench"``: RobustBench's ``WideResNet``, e.g. WRN-28-10 "Standard" (36.5M
    parameters).  No input normalisation.
  - ``"diffpure"``: DiffPure's ``classifiers/cifar10_resnet.py`` WideResNet
    (``WideResNet_70_16_dropout``, the WRN-70-16 of the DiffPure and COUP papers): the same
    keys, but ``forward`` first normalises with the CIFAR-10 mean/std, which are plain
    attributes, not in the state dict.  Its dropout (p=0.3) acts in training only and is
    left out here.

- DeepMind keys (``"dm"``): ``DMWideResNet`` (Gowal et al. 2020, Rebuffi et al. 2021, Wang
  et al. 2023), e.g. WRN-70-16 (266.8M parameters) or WRN-28-10.  Keys: ``mean``, ``std``
  (normalisation buffers), ``init_conv``, ``layer.{0,1,2}.block.N.{batchnorm_0,conv_0,
  batchnorm_1,conv_1,shortcut}``, ``batchnorm``, ``logits``.  "SAME" padding done by hand
  (asymmetric (0,1,0,1) for stride 2), as in the TF original.  The released models use
  Swish (= SiLU) activations; older files lack the mean/std buffers, in which case the
  CIFAR-10 (or, with 100 classes, CIFAR-100) statistics are used.

All take images in **[0, 1]**, (B, 3, 32, 32), and return logits (B, num_classes).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .._files import load_state_dict_strict, load_weights_file, strip_module_prefix

__all__ = ["WideResNet", "DiffPureWideResNet", "DMWideResNet", "load_wideresnet", "LAYOUTS",
           "CIFAR10_MEAN", "CIFAR10_STD"]

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


class DiffPureWideResNet(WideResNet):
    """DiffPure's WideResNet: :class:`WideResNet` applied to (u - mean) / std, CIFAR-10 statistics.

    mean/std are non-persistent buffers (they move with ``.to()`` but are not in the state dict,
    as in DiffPure, where they are plain tensor attributes).
    """

    def __init__(self, depth: int = 70, widen_factor: int = 16, num_classes: int = 10):
        super().__init__(depth, widen_factor, num_classes)
        # device="cpu" even when the model is built under torch.device("meta"): loading assigns
        # only state-dict entries, so these values must be real from the start.
        for name, value in (("mean", CIFAR10_MEAN), ("std", CIFAR10_STD)):
            self.register_buffer(name, torch.tensor(value, device="cpu").view(3, 1, 1), persistent=False)

    def forward(self, u):
        return super().forward((u - self.mean) / self.std)


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
_TRADES_KEYS = "conv1, block1.layer.N..., fc"
_DEEPMIND_KEYS = "init_conv, layer.N.block..., logits"
# layout -> (key family, what it is)
LAYOUTS = {
    "robustbench": ("TRADES", "RobustBench's WideResNet: TRADES keys, no input normalisation"),
    "diffpure": ("TRADES", "DiffPure's classifiers/cifar10_resnet.py WideResNet: RobustBench/TRADES "
                           "keys, CIFAR-10 normalisation inside forward, not in the state dict"),
    "dm": ("DeepMind", "DeepMind's DMWideResNet: DeepMind keys, mean/std buffers"),
}


def _layout_list() -> str:
    return "; ".join(f"{name!r} = {about}" for name, (_, about) in LAYOUTS.items())


def _key_family(sd: dict, path) -> str:
    if "init_conv.weight" in sd or "logits.weight" in sd:
        return "DeepMind"
    if "conv1.weight" in sd and "fc.weight" in sd:
        return "TRADES"
    raise ValueError(f"{path}: not a WideResNet state dict: neither TRADES keys ({_TRADES_KEYS}) nor "
                     f"DeepMind keys ({_DEEPMIND_KEYS}); first keys: {list(sd)[:5]}")


def _choose_layout(layout, family: str, depth: int, path) -> str:
    if layout is None:
        # Within the TRADES family the keys cannot tell the layouts apart.  The WRN-70-16 in it
        # is DiffPure's (the paper's classifier; RobustBench ships its WRN-70-16s in the DeepMind
        # layout), every other depth RobustBench's.
        if family == "DeepMind":
            return "dm"
        return "diffpure" if depth == 70 else "robustbench"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)} ({_layout_list()}); got {layout!r}")
    if LAYOUTS[layout][0] != family:
        keys = _TRADES_KEYS if family == "TRADES" else _DEEPMIND_KEYS
        fits = [name for name, (fam, _) in LAYOUTS.items() if fam == family]
        raise ValueError(f"{path}: layout={layout!r} does not fit the file: its keys are the {family} "
                         f"family ({keys}), which layouts {fits} read. Layouts: {_layout_list()}")
    return layout


def _read_state_dict(path) -> dict:
    obj = load_weights_file(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict' / "
                         "'model_state_dict' / 'model') of tensors")
    return strip_module_prefix(obj, path)


def load_wideresnet(path, depth: int = 28, widen: int = 10, device="cpu",
                    layout: str | None = None, activation: str | None = None,
                    num_classes: int | None = None) -> nn.Module:
    """Load a CIFAR WideResNet checkpoint in one of the :data:`LAYOUTS`.

    Args:
        path: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``: a raw state
            dict or a dict holding it under ``state_dict``/``model_state_dict``/``model``) or
            ``.safetensors``.  A ``module.`` prefix (DataParallel) is stripped; DiffPure's
            ``weights.pt`` is such a raw state dict.
        depth, widen: 28/10 (WideResNet-28-10) or 70/16 (WideResNet-70-16), etc.
        layout: the key family is read from the file; ``None`` picks within it:
            DeepMind keys -> ``"dm"``; TRADES keys -> ``"diffpure"`` at depth 70, else
            ``"robustbench"``.  Pass ``"robustbench"`` for a TRADES-keyed WRN-70 that does
            not normalise, ``"diffpure"`` for DiffPure's classifiers at other depths.
            ``"dm"`` is also the layout of DeepMind-style WRN-28-10s: DiffPure's
            ``wrn-28-10-at0`` / ``at1`` (= RobustBench's ``Gowal2021Improving_28_10_ddpm_100m``
            / ``Gowal2020Uncovering_28_10_extra``) and Wang et al. 2023's models.  A layout
            that contradicts the keys is a ValueError listing the layouts.
        activation: for the "dm" layout, "silu" (= Swish, the default, the released
            models) or "relu".
        num_classes: read from the file (rows of ``fc`` / ``logits``) when None; when given,
            it must agree.
    Returns:
        The classifier in eval mode: u (B, 3, 32, 32) in [0, 1] -> logits.
    Raises:
        ValueError: unknown or contradicting layout or num_classes; keys or shapes do not match
            the architecture.
    """
    sd = _read_state_dict(path)
    family = _key_family(sd, path)
    layout = _choose_layout(layout, family, depth, path)
    if activation is not None and layout != "dm":
        raise ValueError(f"activation applies to layout='dm' only (layout={layout!r} uses ReLU); "
                         f"got activation={activation!r}")
    head = "logits.weight" if family == "DeepMind" else "fc.weight"
    file_classes = sd[head].shape[0] if head in sd else None
    if num_classes is None:
        num_classes = file_classes or 10
    elif file_classes is not None and num_classes != file_classes:
        raise ValueError(f"num_classes={num_classes}, but {path} has {file_classes} classes "
                         f"({head} is {tuple(sd[head].shape)})")
    # Build on the meta device (instant even for 267M parameters), then assign the tensors.
    with torch.device("meta"):
        if layout == "dm":
            model = DMWideResNet(depth, widen, num_classes, activation=activation or "silu")
        else:
            model = (DiffPureWideResNet if layout == "diffpure" else WideResNet)(depth, widen, num_classes)
    arch = {"robustbench": f"RobustBench WideResNet-{depth}-{widen}",
            "diffpure": f"DiffPure WideResNet-{depth}-{widen}",
            "dm": f"DeepMind DMWideResNet-{depth}-{widen}"}[layout]
    # Tolerated absences: older DeepMind files predate the mean/std buffers (use the data
    # set's statistics), and pre-1.0 PyTorch files lack BatchNorm's batch counter.
    if layout == "dm":
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
        sd.setdefault("mean", torch.tensor(mean).view(3, 1, 1))
        sd.setdefault("std", torch.tensor(std).view(3, 1, 1))
    for k in model.state_dict():
        if k.endswith("num_batches_tracked"):
            sd.setdefault(k, torch.tensor(0))
    load_state_dict_strict(model, sd, path, arch)
    return model.to(device).eval()
