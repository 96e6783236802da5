"""The embedded default: a tiny score model and classifier for sklearn's 8x8 digits.

They let the whole pipeline (purification, attacks, exact gradients) run on a laptop
CPU with no download.  Images are 1x8x8; see ``coup_fast.data.load_digits`` for the
fixed train/test split and ``python -m coup_fast.train digits`` for how the shipped
weights in ``coup_fast/weights/`` were made.

- :class:`DigitsEpsNet`: epsilon-prediction U-Net, x in [-1, 1] (B, 1, 8, 8), time
  label 999 t (B,)  ->  eps_hat (B, 1, 8, 8).  Wrapped by
  :func:`coup_fast.score.score_sde_continuous` it is a score model.
- :class:`DigitsClassifier`: small CNN, u in [0, 1] (B, 1, 8, 8) -> logits (B, 10).
  SiLU rather than ReLU so that its input Hessian (used by the exact adjoint of the
  guided sampler) is not almost everywhere zero.
"""
from __future__ import annotations

import inspect
import json
import math
import os

import torch
from torch import nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .._files import load_state_dict_strict, load_weights_file
from ..score import score_sde_continuous

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
SCORE_FILE = "digits_score.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
META_FILE = "digits.json"


def timestep_embedding(label: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer sinusoidal embedding of a (B,) time label -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) * torch.arange(half, device=label.device,
                                                               dtype=torch.float32) / (half - 1))
    arg = label.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).to(label.dtype)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between; 1x1 skip if channels change."""

    def __init__(self, cin: int, cout: int, temb_dim: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(min(8, cin // 4), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm1 = nn.GroupNorm(min(8, cout // 4), cout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        return self.skip(x) + h


class DigitsEpsNet(nn.Module):
    """Two-level U-Net (8x8 -> 4x4 -> 8x8) predicting the noise of a 1x8x8 image.

    forward(x, label): x (B, 1, 8, 8) in the diffusion space ([-1, 1] at t = 0),
    label (B,) = 999 t; returns eps_hat (B, 1, 8, 8).
    """

    def __init__(self, ch: int = 16, ch2: int = 32, temb_dim: int = 64):
        super().__init__()
        self.config = {"ch": ch, "ch2": ch2, "temb_dim": temb_dim}
        self.temb_dim = temb_dim
        self.temb_mlp = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(),
                                      nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down0 = _ResBlock(ch, ch, temb_dim)                    # 8x8
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # -> 4x4
        self.mid0 = _ResBlock(ch, ch2, temb_dim)
        self.mid1 = _ResBlock(ch2, ch2, temb_dim)
        self.up0 = _ResBlock(ch2 + ch, ch, temb_dim)                # after upsample + skip
        self.out0 = _ResBlock(2 * ch, ch, temb_dim)                 # 8x8, with input skip
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        temb = self.temb_mlp(timestep_embedding(label, self.temb_dim).to(x.dtype))
        h0 = self.conv_in(x)
        h1 = self.down0(h0, temb)
        h = self.downsample(h1)
        h = self.mid1(self.mid0(h, temb), temb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up0(torch.cat([h, h1], 1), temb)
        h = self.out0(torch.cat([h, h0], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits: u in [0, 1] (B, 1, 8, 8) -> logits (B, 10)."""

    def __init__(self, ch: int = 32, hidden: int = 128):
        super().__init__()
        self.config = {"ch": ch, "hidden": hidden}
        self.features = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1), nn.SiLU(),                     # 8x8
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.SiLU(),      # 4x4
            nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1), nn.SiLU(),  # 2x2
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * ch * 4, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 10))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # Centre the input so that the first layer sees zero-mean-ish data.
        return self.head(self.features(2.0 * u - 1.0))


# What digits.json may hold (coup_fast.train writes it): the two architectures, which the loader
# builds, and descriptive sections, which it only type-checks.
_META_SECTIONS = {"dataset": str, "split": dict, "score_config": dict, "classifier_config": dict, "sde": dict,
                  "training": dict, "metrics": dict}
_ARCHITECTURES = {"score_config": DigitsEpsNet, "classifier_config": DigitsClassifier}
_MAX_META_BYTES = 1 << 20


def _read_meta(path: str) -> dict:
    """digits.json, checked: known sections of the right types; {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_META_BYTES + 1)
        if len(raw) > _MAX_META_BYTES:
            raise ValueError(f"larger than {_MAX_META_BYTES:,} bytes; the real one is about 2 KB")
        meta = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not readable JSON ({str(e)[:300]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, value in meta.items():
        if key not in _META_SECTIONS:
            raise ValueError(f"{path}: unknown key {key!r:.80} (known: {', '.join(_META_SECTIONS)})")
        if not isinstance(value, _META_SECTIONS[key]):
            raise ValueError(f"{path}: {key} must be a JSON {'string' if _META_SECTIONS[key] is str else 'object'}, "
                             f"got {value!r:.80}")
    return meta


def _build_on_meta(cls, section: str, config: dict, meta_path: str) -> nn.Module:
    """cls(**config) on the meta device (no memory), each config value checked first."""
    params = inspect.signature(cls.__init__).parameters
    known = [name for name in params if name != "self"]
    for key, value in config.items():
        if key not in known:
            raise ValueError(f"{meta_path}: unknown key {section}.{key:.80} (known: {', '.join(known)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{meta_path}: {section}.{key} must be an integer >= 1, got {value!r:.80}")
    try:
        with torch.device("meta"):
            return cls(**config)
    except (ValueError, RuntimeError) as e:  # e.g. GroupNorm: channels not divisible by the groups
        raise ValueError(f"{meta_path}: {section} {config} does not build a {cls.__name__}: {e}") from None


def _arch(module: nn.Module, section: str) -> str:
    config = ", ".join(f"{k}={v}" for k, v in module.config.items())
    return f"{type(module).__name__}({config}) ({section} of {META_FILE})"


def _check_shapes(module: nn.Module, weights_path: str, section: str) -> None:
    """Every tensor of `module` against the file's, from its header alone (nothing is loaded)."""
    try:
        with safe_open(weights_path, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    arch = _arch(module, section)
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not match {arch}: {len(missing)} missing tensors (first: "
                         f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
    bad = [k for k in expected if stored[k] != expected[k]]
    if bad:
        raise ValueError(f"{weights_path}: shape mismatch with {arch}: {bad[0]} is {stored[bad[0]]} in the file, "
                         f"{expected[bad[0]]} in the model ({len(bad)} mismatched tensors)")


def load_digits_models(device="cpu", weights_dir: str | None = None):
    """Load the shipped digits models (or those under `weights_dir`, as `coup_fast.train` writes them).

    Returns:
        score_model: callable ``(x, t) -> score``; x (B, 1, 8, 8) in [-1, 1], t a float,
            0-d or (B,) tensor.  A :class:`coup_fast.score.EpsilonScore` (its
            ``.eps_model`` is the raw noise predictor, called with label 999 t).
        classifier: u (B, 1, 8, 8) in [0, 1] -> logits (B, 10).
    Both are in eval mode with ``requires_grad`` off on their parameters.

    The architectures come from ``digits.json`` (defaults without it).  Both networks are built
    on the meta device and checked against the weight files' shapes before any memory is
    allocated, so a crafted ``digits.json`` cannot make the loader build a huge network.
    Raises:
        FileNotFoundError: a weight file is missing.
        ValueError: digits.json has an unknown key or a value of the wrong type, or the weight
            files do not match the architectures it describes, or hold weights that are not
            finite real numbers (``coup_fast._files.load_state_dict_strict``).
    """
    d = weights_dir or WEIGHTS_DIR
    paths = [os.path.join(d, f) for f in (SCORE_FILE, CLASSIFIER_FILE)]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: train it with `python -m coup_fast.train digits`")
    meta_path = os.path.join(d, META_FILE)
    meta = _read_meta(meta_path)
    nets = []
    for (section, cls), path in zip(_ARCHITECTURES.items(), paths):
        config = meta.get(section, {})
        net = _build_on_meta(cls, section, config, meta_path)
        _check_shapes(net, path, section)
        nets.append((net, section))
    for (net, section), path in zip(nets, paths):
        # the shared checks: a header naming a tensor twice, weights that are not finite real numbers
        load_state_dict_strict(net, load_weights_file(path), path, _arch(net, section))
    (net, _), (clf, _) = nets
    score = score_sde_continuous(net)
    for m in (score, clf):
        m.to(device).eval().requires_grad_(False)
    return score, clf
