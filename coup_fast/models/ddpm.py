"""The CIFAR-10 DDPM of Ho et al. (2020) in its common PyTorch layout.

A from-scratch re-implementation of the U-Net of "Denoising Diffusion Probabilistic Models"
as pesser/pytorch_diffusion converted it from the TF release: the ``Model`` that
ermongroup/ddim (``models/diffusion.py``) and DiffPure (``ddpm/unet_ddpm.py``) use, so
their CIFAR-10 checkpoints load strictly.  Key names::

    temb.dense.{0,1}, conv_in,
    down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2[,nin_shortcut]},
    down.{i}.attn.{j}.{norm,q,k,v,proj_out}, down.{i}.downsample.conv,
    mid.{block_1,attn_1,block_2}, up.{i}.block.{j}, up.{i}.attn.{j}, up.{i}.upsample.conv,
    norm_out, conv_out

The CIFAR-10 model: ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
dropout=0.1, resamp_with_conv=True; GroupNorm(32 groups, eps=1e-6), swish (= SiLU); 35.7M
parameters.  It predicts the noise eps of x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
at the integer DDPM index t in 0..999 (betas = linspace(1e-4, 0.02, 1000), abar = cumprod(1 - betas)).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .._files import load_state_dict_strict, load_weights_file, strip_module_prefix
from .ncsnpp import timestep_embedding

__all__ = ["DDPMConfig", "DDPMUNet", "ddpm_cifar10", "ddpm_small", "load_ddpm"]

GROUPS = 32  # every GroupNorm of the model has 32 groups


@dataclass(frozen=True)
class DDPMConfig:
    """The knobs of the DDPM U-Net (the fields of the DDIM / DiffPure ``model`` config)."""

    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3


def ddpm_cifar10() -> DDPMConfig:
    """Ho et al.'s CIFAR-10 model (``ema_diffusion_cifar10_model/model-790000.ckpt``)."""
    return DDPMConfig()


def ddpm_small() -> DDPMConfig:
    """Same architecture, tiny widths, for fast tests (attention still at 16x16 on 32x32)."""
    return DDPMConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """h = conv2(dropout(swish(norm2(conv1(swish(norm1(x))) + temb_proj(swish(temb))))));
    out = x + h, with x through a 1x1 conv (``nin_shortcut``) when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv q/k/v/proj_out, residual
    without rescale: x + proj_out(softmax(q^T k / sqrt(C)) v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv after TF-style bottom/right zero padding, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x):
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then (with_conv) a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Level(nn.Module):
    """One resolution of the U-Net: its res blocks, attention blocks and resampler (key names)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Embedding(nn.Module):
    def __init__(self, ch: int, temb_dim: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_dim), nn.Linear(temb_dim, temb_dim)])


class _Middle(nn.Module):
    def __init__(self, ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, temb_dim, dropout)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch, temb_dim, dropout)


class DDPMUNet(nn.Module):
    """The DDPM eps network.

    forward(x, t): x (B, C, S, S) in [-1, 1]; t the DDPM time index in [0, 999], an int /
    float, or a (B,) tensor (integer or float) -> eps_hat (B, C, S, S).

    Down path: per level, num_res_blocks x [ResnetBlock (+ AttnBlock at attn resolutions)],
    each output kept as a skip, then a Downsample except at the last level.  Middle:
    ResnetBlock, AttnBlock, ResnetBlock.  Up path: per level (reversed), num_res_blocks + 1
    x [ResnetBlock on concat(h, skip) (+ AttnBlock)], then an Upsample except at level 0.
    ``up`` is indexed by level (up.0 is the full-resolution one), as in the checkpoints.
    """

    def __init__(self, config: DDPMConfig | None = None):
        super().__init__()
        cfg = config or DDPMConfig()
        self.config = cfg
        ch, ch_mult, nrb = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks
        widths = [ch * m for m in ch_mult]
        if any(w % GROUPS for w in [ch] + widths):
            raise ValueError(f"DDPMConfig: ch * ch_mult must be multiples of {GROUPS} (GroupNorm "
                             f"groups); got ch={ch}, ch_mult={ch_mult}")
        temb_dim = 4 * ch
        self.temb = _Embedding(ch, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        skip_ch = [ch]  # channels of every kept skip activation, in push order
        in_ch, res = ch, cfg.image_size
        self.down = nn.ModuleList()
        for lvl, width in enumerate(widths):
            level = _Level()
            for _ in range(nrb):
                level.block.append(ResnetBlock(in_ch, width, temb_dim, cfg.dropout))
                in_ch = width
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(in_ch))
                skip_ch.append(in_ch)
            if lvl != len(widths) - 1:
                level.downsample = Downsample(in_ch, cfg.resamp_with_conv)
                res //= 2
                skip_ch.append(in_ch)
            self.down.append(level)

        self.mid = _Middle(in_ch, temb_dim, cfg.dropout)

        up = []
        for lvl in reversed(range(len(widths))):
            level = _Level()
            for _ in range(nrb + 1):
                level.block.append(ResnetBlock(in_ch + skip_ch.pop(), widths[lvl], temb_dim, cfg.dropout))
                in_ch = widths[lvl]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(in_ch))
            if lvl != 0:
                level.upsample = Upsample(in_ch, cfg.resamp_with_conv)
                res *= 2
            up.append(level)
        assert not skip_ch
        self.up = nn.ModuleList(reversed(up))  # up[lvl] belongs to level lvl

        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        temb = timestep_embedding(t, self.config.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[i](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def _state_dict_of(path, obj, use_ema: bool) -> dict:
    """The weights to load from the accepted file layouts (see :func:`load_ddpm`)."""
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], dict):
        # ermongroup/ddim's training checkpoint: [model, optimizer, epoch, step] + [ema shadow]
        if not use_ema:
            return obj[0]
        if len(obj) == 5 and isinstance(obj[4], dict):
            return obj[4]
        raise ValueError(f"{path}: a DDIM training checkpoint with {len(obj)} entries has no EMA "
                         "shadow (5th entry); pass use_ema=False to use the model weights")
    raise ValueError(f"{path}: expected a DDPM state dict of tensors or a DDIM training checkpoint "
                     f"[model, optimizer, epoch, step, ema]; got {type(obj).__name__}"
                     + (f" with keys {list(obj)[:5]}" if isinstance(obj, dict) else ""))


def load_ddpm(path, device="cpu", config: DDPMConfig | None = None, use_ema: bool = True) -> DDPMUNet:
    """Load a DDPM U-Net checkpoint (Ho et al.'s CIFAR-10 model by default), strictly and safely.

    Accepted files (read with ``coup_fast._files.load_weights_file``: nothing executed; the
    format is read from the content):

    - a raw state dict, ``.ckpt`` / ``.pth`` / ``.safetensors``: pesser/pytorch_diffusion's
      converted ``diffusion_cifar10_model`` / ``ema_diffusion_cifar10_model`` files, which
      DDIM (``--use_pretrained``) and DiffPure load; keys may carry ``module.``;
    - ermongroup/ddim's own training checkpoint ``ckpt.pth``, the list ``[model.state_dict(),
      optimizer.state_dict(), epoch, step, ema_helper.state_dict()]``: with ``use_ema`` (the
      default) the EMA shadow (5th entry), else the model weights (1st).

    Args:
        config: the architecture; :func:`ddpm_cifar10` by default.
    Returns:
        The :class:`DDPMUNet` in eval mode with ``requires_grad`` off on every parameter
        (input gradients still flow): ``net(x, t)``, x in [-1, 1], t the index in 0..999.
    Raises:
        ValueError: not one of the layouts above, refused by the safe loader, or missing /
            unexpected keys or mismatched shapes (named).
    """
    cfg = config or ddpm_cifar10()
    path = os.fspath(path)
    sd = strip_module_prefix(_state_dict_of(path, load_weights_file(path), use_ema), path)
    with torch.device("meta"):  # no memory and no random init for weights we overwrite
        net = DDPMUNet(cfg)
    load_state_dict_strict(net, sd, path, f"DDPM U-Net {asdict(cfg)}")
    return net.to(device).eval().requires_grad_(False)
