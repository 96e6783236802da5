"""DDPM U-Net (Ho et al. 2020, the pytorch_diffusion / DDIM / DiffPure layout): key names,
blocks and the whole forward against written-out definitions, strict and safe loading."""
import math
import os

import pytest
import torch

from coup_fast.models.ddpm import (AttnBlock, DDPMConfig, DDPMUNet, Downsample, ResnetBlock, Upsample,
                                   ddpm_cifar10, ddpm_small, load_ddpm)
from coup_fast.models.ncsnpp import timestep_embedding

F = torch.nn.functional


def test_cifar10_layout_key_names_shapes_and_parameter_count():
    with torch.device("meta"):
        net = DDPMUNet(ddpm_cifar10())
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.002, n  # Ho et al.: 35.7M parameters for CIFAR-10
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # widths ch * (1, 2, 2, 2) = 128, 256, 256, 256; attention at 16x16 = level 1; skip channels worked
    # out from the recipe (every block output and every downsample output is a skip)
    expected = {
        "temb.dense.0.weight": (512, 128), "temb.dense.1.weight": (512, 512), "conv_in.weight": (128, 3, 3, 3),
        "down.0.block.0.conv1.weight": (128, 128, 3, 3), "down.0.block.1.temb_proj.weight": (128, 512),
        "down.0.downsample.conv.weight": (128, 128, 3, 3),
        "down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1), "down.1.attn.1.q.weight": (256, 256, 1, 1),
        "down.2.downsample.conv.weight": (256, 256, 3, 3),
        "mid.block_1.conv2.weight": (256, 256, 3, 3), "mid.attn_1.proj_out.weight": (256, 256, 1, 1),
        "up.3.block.0.conv1.weight": (256, 512, 3, 3), "up.3.upsample.conv.weight": (256, 256, 3, 3),
        "up.1.block.2.conv1.weight": (256, 384, 3, 3),  # 256 + the 128 of down.0's downsample output
        "up.1.attn.2.norm.weight": (256,), "up.1.block.2.nin_shortcut.weight": (256, 384, 1, 1),
        "up.0.block.2.conv1.weight": (128, 256, 3, 3),  # 128 + conv_in's 128
        "norm_out.weight": (128,), "conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    for absent in ["down.0.block.0.nin_shortcut.weight", "down.0.attn.0.q.weight", "down.3.downsample.conv.weight",
                   "up.0.upsample.conv.weight", "up.2.attn.0.q.weight", "mid.block_1.nin_shortcut.weight"]:
        assert absent not in shapes, absent
    assert len([k for k in shapes if ".attn." in k]) == (2 + 3) * 10  # 2 down + 3 up blocks, 10 tensors each


def _ddpm_embedding(t, dim):
    """Ho et al.'s sinusoidal embedding, written out in float64: for k < dim/2,
    e[k] = sin(t w_k), e[dim/2 + k] = cos(t w_k), w_k = exp(-k ln(10000) / (dim/2 - 1)); odd dim: a 0 appended."""
    half = dim // 2
    rows = []
    for ti in t.tolist():
        w = [math.exp(-k * math.log(10000) / (half - 1)) for k in range(half)]
        rows.append([math.sin(ti * wk) for wk in w] + [math.cos(ti * wk) for wk in w] + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim", [128, 33])
def test_timestep_embedding_is_the_ddpm_formula(dim):
    t = torch.tensor([0, 1, 17, 500, 999])
    got = timestep_embedding(t, dim)
    assert got.shape == (5, dim)
    # float32 arithmetic on arguments up to 999: an absolute error of a few 1e-5
    torch.testing.assert_close(got.double(), _ddpm_embedding(t, dim), rtol=0, atol=2e-4)


def _randomize(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()


def _gn(h, sd, p):
    return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], 1e-6)


def _conv(h, sd, p, **kw):
    return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _resblock_reference(sd, p, x, temb):
    """DDPM ResnetBlock: h = conv1(swish(norm1(x))) + temb_proj(swish(temb)); h = conv2(swish(norm2(h)));
    out = (nin_shortcut(x) if the width changes else x) + h; GroupNorm(32, eps 1e-6)."""
    h = _conv(F.silu(_gn(x, sd, p + "norm1")), sd, p + "conv1", padding=1)
    h = h + F.linear(F.silu(temb), sd[p + "temb_proj.weight"], sd[p + "temb_proj.bias"])[:, :, None, None]
    h = _conv(F.silu(_gn(h, sd, p + "norm2")), sd, p + "conv2", padding=1)
    skip = _conv(x, sd, p + "nin_shortcut") if p + "nin_shortcut.weight" in sd else x
    return skip + h


def _attn_reference(sd, p, x):
    """DDPM AttnBlock: w[b, i, j] = softmax_j(sum_c q[b, c, i] k[b, c, j] / sqrt(C)),
    out[b, c, i] = sum_j w[b, i, j] v[b, c, j]; x + proj_out(out)."""
    B, C, H, W = x.shape
    n = _gn(x, sd, p + "norm")
    q, k, v = (_conv(n, sd, p + name).reshape(B, C, H * W) for name in ("q", "k", "v"))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=2)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + _conv(out, sd, p + "proj_out")


@pytest.mark.parametrize("in_ch, out_ch", [(64, 64), (32, 96)])
def test_resnet_block_matches_the_definition(in_ch, out_ch):
    block = _randomize(ResnetBlock(in_ch, out_ch, temb_dim=24, dropout=0.1).double())
    assert (block.nin_shortcut is None) == (in_ch == out_ch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_ch, 8, 8, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 24, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), _resblock_reference(block.state_dict(), "", x, temb),
                                   rtol=1e-12, atol=1e-12)


def test_attn_block_matches_the_definition():
    block = _randomize(AttnBlock(64).double())
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _attn_reference(block.state_dict(), "", x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_conv", [True, False])
def test_resamplers_match_the_definition(with_conv):
    down, up = _randomize(Downsample(32, with_conv).double()), _randomize(Upsample(32, with_conv).double())
    x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    near = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
    if with_conv:  # stride-2 conv after zero padding the bottom row and right column only
        want_down = _conv(F.pad(x, (0, 1, 0, 1)), down.state_dict(), "conv", stride=2)
        want_up = _conv(near, up.state_dict(), "conv", padding=1)
    else:
        want_down = x.reshape(2, 32, 4, 2, 4, 2).mean((3, 5))
        want_up = near
    with torch.no_grad():
        torch.testing.assert_close(down(x), want_down, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(up(x), want_up, rtol=1e-12, atol=1e-12)
    assert down(x).shape == (2, 32, 4, 4) and up(x).shape == (2, 32, 16, 16)


def _unet_reference(sd, cfg, x, t):
    """The DDPM U-Net forward written out over the checkpoint's key names."""
    half = cfg.ch // 2  # the embedding as the published code computes it: float32, then the network
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freqs[None, :]
    temb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).to(x.dtype)
    temb = F.linear(F.silu(F.linear(temb, sd["temb.dense.0.weight"], sd["temb.dense.0.bias"])),
                    sd["temb.dense.1.weight"], sd["temb.dense.1.bias"])
    levels = len(cfg.ch_mult)
    hs = [_conv(x, sd, "conv_in", padding=1)]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            h = _resblock_reference(sd, f"down.{i}.block.{j}.", hs[-1], temb)
            if f"down.{i}.attn.{j}.q.weight" in sd:
                h = _attn_reference(sd, f"down.{i}.attn.{j}.", h)
            hs.append(h)
        if i != levels - 1:
            h = hs[-1]
            hs.append(_conv(F.pad(h, (0, 1, 0, 1)), sd, f"down.{i}.downsample.conv", stride=2)
                      if cfg.resamp_with_conv else F.avg_pool2d(h, 2))
    h = _resblock_reference(sd, "mid.block_1.", hs[-1], temb)
    h = _resblock_reference(sd, "mid.block_2.", _attn_reference(sd, "mid.attn_1.", h), temb)
    for i in reversed(range(levels)):
        for j in range(cfg.num_res_blocks + 1):
            h = _resblock_reference(sd, f"up.{i}.block.{j}.", torch.cat([h, hs.pop()], dim=1), temb)
            if f"up.{i}.attn.{j}.q.weight" in sd:
                h = _attn_reference(sd, f"up.{i}.attn.{j}.", h)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if cfg.resamp_with_conv:
                h = _conv(h, sd, f"up.{i}.upsample.conv", padding=1)
    assert not hs
    return _conv(F.silu(_gn(h, sd, "norm_out")), sd, "conv_out", padding=1)


@pytest.mark.parametrize("cfg", [
    ddpm_small(),
    DDPMConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), image_size=16),
    DDPMConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resamp_with_conv=False, image_size=8),
], ids=["small", "3-levels", "no-resample-conv"])
def test_whole_forward_matches_the_definition_over_the_key_names(cfg):
    net = _randomize(DDPMUNet(cfg).double(), scale=0.1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([7, 912])
    with torch.no_grad():
        got = net(x, t)
        torch.testing.assert_close(got, _unet_reference(net.state_dict(), cfg, x, t), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(net(x, 912)[1], got[1])  # a scalar index is broadcast over the batch
        torch.testing.assert_close(net(x, t.double()), got)  # float indices too
    assert got.shape == x.shape


def _random_state_dict(cfg, seed=0):
    return {k: v.detach().clone() for k, v in _randomize(DDPMUNet(cfg), seed=seed, scale=0.1).state_dict().items()}


@pytest.mark.parametrize("fmt", ["raw", "module_prefix", "safetensors", "ddim_ckpt_ema", "ddim_ckpt_model"])
def test_loads_the_published_file_layouts_strictly(tmp_path, fmt):
    cfg = ddpm_small()
    model_sd, ema_sd = _random_state_dict(cfg, 0), _random_state_dict(cfg, 1)
    path = tmp_path / "model-790000.ckpt"
    if fmt == "raw":  # pesser/pytorch_diffusion's converted ema_diffusion_cifar10_model file
        torch.save(ema_sd, path)
    elif fmt == "module_prefix":
        torch.save({"module." + k: v for k, v in ema_sd.items()}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "ema.safetensors"
        save_file(ema_sd, str(path))
    else:  # ermongroup/ddim's ckpt.pth: [DataParallel model, Adam, epoch, step, EMAHelper shadow (unwrapped)]
        params = [torch.nn.Parameter(v.clone()) for v in model_sd.values()]
        optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        torch.save([{"module." + k: v for k, v in model_sd.items()}, optimizer.state_dict(), 3, 1234, ema_sd], path)
    use_ema = fmt != "ddim_ckpt_model"
    net = load_ddpm(path, config=cfg, use_ema=use_ema)
    want = ema_sd if use_ema else model_sd
    assert net.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    net(x, torch.tensor([10])).square().sum().backward()  # input gradients still flow
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    cfg = ddpm_small()
    sd = _random_state_dict(cfg)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "mid.attn_1.q.bias"}, r"1 missing keys.*mid\.attn_1\.q\.bias"),
        "unexpected": ({**sd, "up.0.upsample.conv.weight": torch.zeros(32, 32, 3, 3)},
                       r"1 unexpected keys.*up\.0\.upsample\.conv\.weight"),
        "shape": ({**sd, "conv_out.weight": torch.zeros(3, 32, 1, 1)},
                  r"shape mismatch.*conv_out\.weight is \(3, 32, 1, 1\) in the file, \(3, 32, 3, 3\)"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=pattern):
            load_ddpm(path, config=cfg)
    small = tmp_path / "small.ckpt"
    torch.save(sd, small)
    with pytest.raises(ValueError, match=r"DDPM U-Net .*'ch': 128.*(missing|shape)"):
        load_ddpm(small)  # the CIFAR-10 architecture by default
    ddim_without_ema = tmp_path / "ckpt.pth"
    torch.save([sd, {"state": {}, "param_groups": []}, 0, 10], ddim_without_ema)
    with pytest.raises(ValueError, match=r"no EMA shadow.*use_ema=False"):
        load_ddpm(ddim_without_ema, config=cfg)
    other = tmp_path / "other.ckpt"
    torch.save({"model": sd, "step": 3}, other)
    with pytest.raises(ValueError, match=r"expected a DDPM state dict.*keys \['model', 'step'\]"):
        load_ddpm(other, config=cfg)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "ckpt.pth"
    torch.save([_random_state_dict(ddpm_small()), {"hook": _Payload(marker)}, 0, 1], path)
    with pytest.raises(ValueError, match=rf"refused.*GLOBAL {os.system.__module__}\.system"):
        load_ddpm(path, config=ddpm_small(), use_ema=False)
    assert not marker.exists()


def test_bad_time_shape_and_config_are_clear_errors():
    net = DDPMUNet(ddpm_small())
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(2,\)"):
        net(torch.zeros(2, 3, 32, 32), torch.zeros(3))
    with pytest.raises(ValueError, match=r"multiples of 32.*ch=48"):
        DDPMUNet(DDPMConfig(ch=48))
