"""NCSN++ (Score SDE DDPM++ cont. deep): key layout, checkpoint loading, EMA, shapes."""
import time

import pytest
import torch

from coup_fast.models.ncsnpp import NCSNpp, load_ncsnpp, ncsnpp_cifar10_deep, ncsnpp_small
from coup_fast.sde import vp_sigma




def _fake_checkpoint(path, cfg, seed=0):
    """A file shaped like score_sde's checkpoint_8.pth: {'model', 'ema', 'optimizer', 'step'}.

    model keys carry 'module.' (DataParallel) plus the 'sigmas' buffer real files have;
    the EMA shadow params differ from the model weights.
    """
    torch.manual_seed(seed)
    net = NCSNpp(cfg)
    model_sd = {"module." + k: v.clone() for k, v in net.state_dict().items()}
    model_sd["module.sigmas"] = torch.linspace(50.0, 0.01, 1000)
    shadow = [p.detach() + 0.5 * torch.randn_like(p) for p in net.parameters()]
    torch.save({"model": model_sd,
                "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
                "optimizer": {"state": {}, "param_groups": []},
                "step": 1234}, path)
    return net, shadow


def test_full_config_layout_and_parameter_count():
    with torch.device("meta"):  # no memory, instant
        net = NCSNpp(ncsnpp_cifar10_deep())
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 106.6e6) / 106.6e6 < 0.005, n
    keys = list(net.state_dict())
    # names of score_sde's layout: 91 modules, biggan blocks, NIN attention
    assert keys[:4] == ["all_modules.0.weight", "all_modules.0.bias", "all_modules.1.weight", "all_modules.1.bias"]
    assert keys[-2:] == ["all_modules.90.weight", "all_modules.90.bias"]
    for k in ["all_modules.3.GroupNorm_0.weight", "all_modules.3.Conv_0.weight", "all_modules.3.Dense_0.bias",
              "all_modules.3.GroupNorm_1.bias", "all_modules.3.Conv_1.weight",
              "all_modules.11.Conv_2.weight",        # first down block: 1x1 skip conv
              "all_modules.13.NIN_0.W", "all_modules.13.NIN_3.b", "all_modules.13.GroupNorm_0.weight"]:
        assert k in keys, k
    sd = net.state_dict()
    assert sd["all_modules.13.NIN_0.W"].shape == (256, 256)  # attention at 16x16, 2*nf channels
    assert sd["all_modules.3.Dense_0.weight"].shape == (128, 512)
    assert sd["all_modules.2.weight"].shape == (128, 3, 3, 3)
    assert sd["all_modules.89.weight"].shape == (128,)  # final GroupNorm


@pytest.mark.slow
def test_full_model_forward_batch1():
    torch.manual_seed(0)
    net = NCSNpp(ncsnpp_cifar10_deep()).eval()
    t0 = time.time()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 32, 32), torch.tensor([99.9]))
    assert y.shape == (1, 3, 32, 32) and torch.isfinite(y).all()
    assert time.time() - t0 < 60


def test_load_uses_ema_and_strips_prefix(tmp_path):
    cfg = ncsnpp_small()
    path = tmp_path / "checkpoint_8.pth"
    net, shadow = _fake_checkpoint(path, cfg)
    loaded = load_ncsnpp(path, config=cfg, return_net=True)
    for p, s in zip(loaded.parameters(), shadow):
        assert torch.equal(p, s)
    raw = load_ncsnpp(path, config=cfg, use_ema=False, return_net=True)
    for p, q in zip(raw.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert not loaded.training


def test_score_wrapper_and_shapes(tmp_path):
    cfg = ncsnpp_small()
    path = tmp_path / "ck.pth"
    _fake_checkpoint(path, cfg)
    score = load_ncsnpp(path, config=cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = torch.tensor([0.05, 0.1])
    with torch.no_grad():
        s = score(x, t)
        eps = score.eps_model(x, 999 * t)
        s_scalar = score(x, 0.1)
    assert s.shape == (2, 3, 32, 32)
    torch.testing.assert_close(s, -eps / vp_sigma(t).view(2, 1, 1, 1))
    torch.testing.assert_close(s_scalar[1], s[1])


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pth"
    _fake_checkpoint(path, ncsnpp_small())
    with pytest.raises(ValueError, match=r"(?s)NCSN\+\+.*(missing|shape)"):
        load_ncsnpp(path)  # expects the full deep config
    other = tmp_path / "wrn.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(16, 3, 3, 3)}}, other)
    with pytest.raises(ValueError, match=r"missing.*unexpected.*conv1\.weight"):
        load_ncsnpp(other, config=ncsnpp_small())
    bare = tmp_path / "bare.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="'model' entry"):
        load_ncsnpp(bare)


@pytest.mark.parametrize("cfg", [ncsnpp_small(), ncsnpp_cifar10_deep()])
def test_forward_visits_every_module_once_in_order(cfg):
    """The forward pass walks all_modules in construction order (what the key names encode)."""
    with torch.device("meta"):
        net = NCSNpp(cfg)
    calls = []
    for idx, m in enumerate(net.all_modules):
        m.register_forward_hook(lambda mod, inp, out, idx=idx: calls.append(idx))
    net(torch.empty(1, 3, 32, 32, device="meta"), torch.empty(1, device="meta"))
    assert calls == list(range(len(net.all_modules)))


class _NotATensor:
    pass


def test_unsafe_pickle_and_malformed_model_entry_are_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="refused by torch.load\\(weights_only=True\\)"):
        load_ncsnpp(evil, config=ncsnpp_small())
    odd = tmp_path / "odd.pth"
    torch.save({"model": [torch.zeros(1)]}, odd)
    with pytest.raises(ValueError, match="'model' entry"):
        load_ncsnpp(odd, config=ncsnpp_small())


@pytest.mark.parametrize("kind", ["same", "wider", "up", "down"])
def test_resblock_matches_the_score_sde_definition(kind):
    # ResnetBlockBigGANpp (Song et al. 2021, fir=False, skip_rescale=True), written out from its
    # parameters: h = Conv_1(silu(GN_1(Conv_0(resample(silu(GN_0(x)))) + Dense_0(silu(temb)))));
    # out = (Conv_2(resample(x)) or resample(x) + h) / sqrt(2); GroupNorm groups min(C/4, 32), eps 1e-6
    from coup_fast.models.ncsnpp import ResnetBlockBigGANpp

    F = torch.nn.functional
    out_ch = {"same": 8, "wider": 16, "up": 8, "down": 8}[kind]
    block = ResnetBlockBigGANpp(8, out_ch, temb_dim=12, up=kind == "up", down=kind == "down").double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    x = torch.randn(2, 8, 8, 8, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)
    resample = {"up": lambda v: F.interpolate(v, scale_factor=2, mode="nearest"),
                "down": lambda v: F.avg_pool2d(v, 2)}.get(kind, lambda v: v)
    b = block
    h = F.silu(F.group_norm(x, 2, b.GroupNorm_0.weight, b.GroupNorm_0.bias, 1e-6))
    h = F.conv2d(resample(h), b.Conv_0.weight, b.Conv_0.bias, padding=1)
    h = h + F.linear(F.silu(temb), b.Dense_0.weight, b.Dense_0.bias)[:, :, None, None]
    h = F.silu(F.group_norm(h, min(out_ch // 4, 32), b.GroupNorm_1.weight, b.GroupNorm_1.bias, 1e-6))
    h = F.conv2d(h, b.Conv_1.weight, b.Conv_1.bias, padding=1)
    skip = resample(x) if kind == "same" else F.conv2d(resample(x), b.Conv_2.weight, b.Conv_2.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), (skip + h) / 2**0.5, rtol=1e-12, atol=1e-12)
