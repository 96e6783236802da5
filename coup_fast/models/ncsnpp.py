"""Score SDE's NCSN++ network (the "DDPM++ cont. (deep)" CIFAR-10 score model).

A from-scratch re-implementation of the architecture of Song et al., "Score-Based
Generative Modeling through Stochastic Differential Equations" (ICLR 2021), restricted
to the options the ``vp/cifar10_ddpmpp_deep_continuous`` config uses:

    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,),
    resblock_type=biggan, fir=False, skip_rescale=True, progressive=none,
    progressive_input=none, embedding_type=positional, conditional=True,
    dropout=0.1, centered=True, scale_by_sigma=False, GroupNorm, SiLU.

Parameter names match the official PyTorch checkpoints exactly (``all_modules.N.*``
ModuleList, ``NIN`` layers with ``W``/``b``, ``ResnetBlockBigGANpp`` with
``GroupNorm_0/Conv_0/Dense_0/GroupNorm_1/Conv_1/Conv_2``, ``AttnBlockpp`` with
``GroupNorm_0/NIN_0..3``), so ``checkpoint_8.pth`` loads strictly.

The network predicts the noise eps (continuous VP training with time label 999 t);
:func:`load_ncsnpp` wraps it as a score model ``(x, t) -> -eps/sigma(t)``, x in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .._files import check_weight, load_state_dict_strict, load_weights_file, strip_module_prefix
from ..score import score_sde_continuous

__all__ = ["NCSNppConfig", "NCSNpp", "ncsnpp_cifar10_deep", "ncsnpp_small", "load_ncsnpp"]


@dataclass(frozen=True)
class NCSNppConfig:
    """The architecture knobs that vary; everything else is fixed to the DDPM++ cont. choices."""

    nf: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple = (16,)
    image_size: int = 32
    num_channels: int = 3
    dropout: float = 0.1


def ncsnpp_cifar10_deep() -> NCSNppConfig:
    """``vp/cifar10_ddpmpp_deep_continuous`` (about 106.6M parameters)."""
    return NCSNppConfig()


def ncsnpp_small() -> NCSNppConfig:
    """Same architecture, tiny widths, for fast tests (attention still at 16x16)."""
    return NCSNppConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))


def _groups(ch: int) -> int:
    return min(ch // 4, 32)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) time label -> (B, dim): [sin(t w_k), cos(t w_k)],
    w_k = max_positions^(-k/(dim/2 - 1)) (DDPM's convention)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * -(math.log(max_positions) / (half - 1)))
    arg = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): y[b,:,h,w] = x[b,:,h,w] @ W + b.

    W has shape (in_dim, num_units), the transpose of a 1x1 conv weight, as in the checkpoint.
    """

    def __init__(self, in_dim: int, num_units: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        self.b = nn.Parameter(torch.zeros(num_units))
        nn.init.xavier_uniform_(self.W)

    def forward(self, x):
        # A 1x1 convolution with weight W^T: same maths as the einsum, faster kernels.
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all H*W positions, residual with 1/sqrt(2) rescale."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)  # query
        self.NIN_1 = NIN(channels, channels)  # key
        self.NIN_2 = NIN(channels, channels)  # value
        self.NIN_3 = NIN(channels, channels)  # output projection

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.NIN_1(h).flatten(2).transpose(1, 2)
        v = self.NIN_2(h).flatten(2).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v)   # softmax(q k^T / sqrt(C)) v
        h = self.NIN_3(h.transpose(1, 2).reshape(B, C, H, W))
        return (x + h) / math.sqrt(2.0)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block with optional 2x nearest up / 2x average-pool down
    (fir=False), time-embedding bias, and skip rescale by 1/sqrt(2).

    x: (B, in_ch, H, W), temb: (B, temb_dim) -> (B, out_ch, H', W').
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up, self.down = up, down
        self.GroupNorm_0 = nn.GroupNorm(_groups(in_ch), in_ch, eps=1e-6)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = nn.GroupNorm(_groups(out_ch), out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.has_skip_conv = in_ch != out_ch or up or down
        if self.has_skip_conv:
            self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, temb=None):
        h = F.silu(self.GroupNorm_0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = F.silu(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.has_skip_conv:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0)


class NCSNpp(nn.Module):
    """NCSN++ (DDPM++ variant) epsilon network.

    forward(x, time_label): x (B, C, S, S) in [-1, 1] (centered data), time_label (B,)
    float = 999 t for the continuous VP models; returns eps_hat (B, C, S, S).

    Module order in ``all_modules`` (this fixes the checkpoint key names):
      0, 1   time-embedding MLP (Linear nf->4nf, Linear 4nf->4nf)
      2      input conv3x3
      down:  per level, num_res_blocks x [ResBlock (+ Attn at attn resolutions)],
             then a down-ResBlock except at the last level
      mid:   ResBlock, Attn, ResBlock
      up:    per level (reversed), num_res_blocks+1 x ResBlock on concat skips,
             Attn at attn resolutions, then an up-ResBlock except at level 0
      last:  GroupNorm, conv3x3 -> C channels
    """

    def __init__(self, config: NCSNppConfig | None = None):
        super().__init__()
        cfg = config or NCSNppConfig()
        self.config = cfg
        nf, ch_mult, nrb = cfg.nf, tuple(cfg.ch_mult), cfg.num_res_blocks
        self.nf = nf
        n_levels = len(ch_mult)
        resolutions = [cfg.image_size // (2 ** i) for i in range(n_levels)]
        temb_dim = 4 * nf

        def block(in_ch, out_ch=None, **kw):
            return ResnetBlockBigGANpp(in_ch, out_ch, temb_dim=temb_dim, dropout=cfg.dropout, **kw)

        m = [nn.Linear(nf, temb_dim), nn.Linear(temb_dim, temb_dim),
             nn.Conv2d(cfg.num_channels, nf, 3, padding=1)]
        skip_ch = [nf]  # channels of every stored skip activation, in push order
        in_ch = nf
        for lvl in range(n_levels):
            for _ in range(nrb):
                out_ch = nf * ch_mult[lvl]
                m.append(block(in_ch, out_ch))
                in_ch = out_ch
                if resolutions[lvl] in cfg.attn_resolutions:
                    m.append(AttnBlockpp(in_ch))
                skip_ch.append(in_ch)
            if lvl != n_levels - 1:
                m.append(block(in_ch, down=True))
                skip_ch.append(in_ch)

        m += [block(in_ch), AttnBlockpp(in_ch), block(in_ch)]

        for lvl in reversed(range(n_levels)):
            for _ in range(nrb + 1):
                out_ch = nf * ch_mult[lvl]
                m.append(block(in_ch + skip_ch.pop(), out_ch))
                in_ch = out_ch
            if resolutions[lvl] in cfg.attn_resolutions:
                m.append(AttnBlockpp(in_ch))
            if lvl != 0:
                m.append(block(in_ch, up=True))
        assert not skip_ch

        m += [nn.GroupNorm(_groups(in_ch), in_ch, eps=1e-6),
              nn.Conv2d(in_ch, cfg.num_channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(m)

    def forward(self, x: torch.Tensor, time_label: torch.Tensor) -> torch.Tensor:
        cfg, mods = self.config, self.all_modules
        attn_res = cfg.attn_resolutions
        temb = timestep_embedding(time_label, self.nf).to(x.dtype)
        temb = mods[1](F.silu(mods[0](temb)))
        hs = [mods[2](x)]
        i = 3  # next index into all_modules, in construction order (plain indexing: compile-friendly)
        n_levels = len(cfg.ch_mult)
        for lvl in range(n_levels):
            for _ in range(cfg.num_res_blocks):
                h = mods[i](hs[-1], temb)
                i += 1
                if h.shape[-1] in attn_res:
                    h = mods[i](h)
                    i += 1
                hs.append(h)
            if lvl != n_levels - 1:
                hs.append(mods[i](hs[-1], temb))
                i += 1

        h = mods[i](hs[-1], temb)
        h = mods[i + 1](h)
        h = mods[i + 2](h, temb)
        i += 3

        for lvl in reversed(range(n_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = mods[i](torch.cat([h, hs.pop()], dim=1), temb)
                i += 1
            if h.shape[-1] in attn_res:
                h = mods[i](h)
                i += 1
            if lvl != 0:
                h = mods[i](h, temb)
                i += 1

        h = F.silu(mods[i](h))
        return mods[i + 1](h)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values())


def _model_weights(path, ckpt) -> tuple[dict, bool]:
    """(state dict, whether the file is a checkpoint dict that may carry 'ema')."""
    if isinstance(ckpt, dict) and "model" in ckpt:
        if not isinstance(ckpt["model"], dict):
            raise ValueError(f"{path}: the 'model' entry is a {type(ckpt['model']).__name__}, "
                             "expected a state dict")
        return ckpt["model"], True
    if _is_tensor_dict(ckpt):
        return ckpt, False  # already the weights to use (e.g. the EMA weights re-saved)
    raise ValueError(
        f"{path}: expected a Score SDE checkpoint dict with a 'model' entry (and 'ema'), or a "
        f"plain NCSN++ state dict of tensors; got {type(ckpt).__name__}"
        + (f" with keys {list(ckpt)[:5]}" if isinstance(ckpt, dict) else ""))


def _ema_shadow(path, ckpt) -> list:
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(torch.is_tensor(s) for s in shadow):
        raise ValueError(f"{path}: use_ema=True needs an 'ema' entry with a 'shadow_params' list "
                         "of tensors (score_sde's ExponentialMovingAverage.state_dict()); "
                         "pass use_ema=False to use the 'model' weights")
    return list(shadow)


def load_ncsnpp(path, device="cpu", use_ema: bool = True, config: NCSNppConfig | None = None,
                return_net: bool = False):
    """Load a Score SDE NCSN++ checkpoint (e.g. ``checkpoint_8.pth``) as a score model.

    Accepted files (the format is read from the content):

    - Score SDE's own checkpoint, as its ``save_checkpoint`` writes it: ``{'model':
      state_dict, 'ema': {'decay', 'num_updates', 'shadow_params': [...]}, 'optimizer',
      'step'}``, or any ``{'model': ..., 'ema': ...}`` dict.  ``model`` keys may carry
      ``module.`` (DataParallel).  With ``use_ema`` (the default, and the weights the paper
      uses) the EMA shadow parameters replace ``model.parameters()`` in order, as score_sde's
      ``ema.copy_to`` does.  The optimizer's numpy-float64 learning rate is allowed through.
    - A plain NCSN++ state dict (``.pth`` or ``.safetensors``): taken as the weights to use,
      i.e. already the EMA weights; ``use_ema`` does not apply.

    The ``sigmas`` buffer some checkpoints carry is ignored (it only matters for
    scale_by_sigma=True).  Nothing in the file is executed (``coup_fast._files.load_weights_file``).
    To convert a checkpoint once into a file holding only the EMA weights::

        from safetensors.torch import save_file
        from coup_fast.models import load_ncsnpp
        net = load_ncsnpp("checkpoint_8.pth", return_net=True)  # EMA weights applied
        save_file(net.state_dict(), "cifar10_ddpmpp_deep_continuous_ema.safetensors")

    Returns:
        A :class:`coup_fast.score.EpsilonScore` in eval mode: ``score(x, t)``, x (B, 3, 32, 32)
        in [-1, 1], t float or (B,) -> score (B, 3, 32, 32).  Its ``.eps_model`` is the NCSN++.
        With ``return_net=True``, the bare :class:`NCSNpp` instead.

    Raises:
        ValueError: the file is not one of the above, is refused by the safe loader, or does
            not match the architecture (missing / unexpected keys or shapes named).
    """
    cfg = config or ncsnpp_cifar10_deep()
    ckpt = load_weights_file(path)
    sd, is_checkpoint = _model_weights(path, ckpt)
    sd = strip_module_prefix(sd, path)
    sd.pop("sigmas", None)
    # Build on the meta device: no memory and no random init for weights we overwrite.
    with torch.device("meta"):
        net = NCSNpp(cfg)
    arch = f"NCSN++ {asdict(cfg)} (Score SDE vp/cifar10_ddpmpp_deep_continuous layout)"
    load_state_dict_strict(net, sd, path, arch)
    if use_ema and is_checkpoint:
        shadow = _ema_shadow(path, ckpt)
        params = list(net.named_parameters())
        if len(shadow) != len(params):
            raise ValueError(f"{path}: 'ema' has {len(shadow)} shadow params, {arch} has "
                             f"{len(params)} parameters")
        with torch.no_grad():
            for i, ((name, p), s) in enumerate(zip(params, shadow)):
                if p.shape != s.shape:
                    raise ValueError(f"{path}: EMA shadow param for {name} is {tuple(s.shape)}, "
                                     f"the model's is {tuple(p.shape)}")
                p.copy_(check_weight(path, f"ema.shadow_params[{i}] (for {name})", s, p))
    net = net.to(device).eval()
    if return_net:
        return net
    return score_sde_continuous(net).eval()
