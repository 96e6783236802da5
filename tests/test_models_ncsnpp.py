"""NCSN++ (Score SDE DDPM++ cont. deep): key layout, checkpoint loading, EMA, shapes."""
import os
import time

import numpy as np
import pytest
import torch

from coup_fast.models.ncsnpp import NCSNpp, load_ncsnpp, ncsnpp_cifar10_deep, ncsnpp_small
from coup_fast.sde import vp_sigma
from test_files import NUMPY1_SCALAR, NUMPY2_SCALAR, pickled_bytes, save_with_numpy1_names


def _score_sde_checkpoint(path, cfg, seed=0, numpy_names="numpy2", extra=None):
    """A file written the way score_sde's training loop writes checkpoint_8.pth.

    run_lib.train: model = DataParallel(NCSNpp) (keys 'module.*', with the 'sigmas' buffer the
    official NCSNpp registers), optimizer = Adam(lr=2e-4, betas=(0.9, 0.999), eps=1e-8),
    ema = ExponentialMovingAverage(params, 0.9999).  losses.optimization_manager sets
    g['lr'] = lr * np.minimum(step / warmup, 1.0), a numpy.float64, before optimizer.step();
    then ema.update.  utils.save_checkpoint: torch.save({'optimizer': optimizer.state_dict(),
    'model': model.state_dict(), 'ema': ema.state_dict(), 'step': step}).
    Returns (model state dict without prefix, EMA shadow params).
    """
    torch.manual_seed(seed)
    net = NCSNpp(cfg)
    sigmas = np.exp(np.linspace(np.log(50.0), np.log(0.01), 1000))  # utils.get_sigmas: float64
    net.register_buffer("sigmas", torch.tensor(sigmas))
    model = torch.nn.DataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    shadow = [p.clone().detach() for p in model.parameters() if p.requires_grad]
    step, decay, num_updates = 1, 0.9999, 0
    loss = model(torch.randn(1, 3, 32, 32), torch.tensor([500.0])).square().mean()
    loss.backward()
    for g in optimizer.param_groups:
        g["lr"] = 2e-4 * np.minimum(step / 5000, 1.0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    num_updates += 1  # ExponentialMovingAverage.update with use_num_updates=True
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    with torch.no_grad():
        for s, p in zip(shadow, model.parameters()):
            s.sub_((1 - d) * (s - p))
    ckpt = {"optimizer": optimizer.state_dict(), "model": model.state_dict(),
            "ema": {"decay": decay, "num_updates": num_updates, "shadow_params": shadow}, "step": step}
    assert type(ckpt["optimizer"]["param_groups"][0]["lr"]) is np.float64
    ckpt.update(extra or {})
    (save_with_numpy1_names if numpy_names == "numpy1" else torch.save)(ckpt, path)
    model_sd = {k[len("module."):]: v.detach().clone() for k, v in ckpt["model"].items()}
    return model_sd, shadow


def _ema_state_dict(cfg, shadow):
    """score_sde's ema.copy_to(model.parameters()): the shadow list laid onto the parameters in order."""
    with torch.device("meta"):
        names = [name for name, _ in NCSNpp(cfg).named_parameters()]
    assert len(names) == len(shadow)
    return dict(zip(names, shadow))


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


@pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])
def test_score_sde_checkpoint_with_numpy_learning_rate_loads(tmp_path, numpy_names):
    cfg = ncsnpp_small()
    path = tmp_path / "checkpoint_8.pth"
    model_sd, shadow = _score_sde_checkpoint(path, cfg, numpy_names=numpy_names)
    stream = pickled_bytes(path)  # the file carries the numpy scalar under the name set under test
    assert (NUMPY1_SCALAR in stream) == (numpy_names == "numpy1")
    assert (NUMPY2_SCALAR in stream) == (numpy_names == "numpy2")
    loaded = load_ncsnpp(path, config=cfg, return_net=True)
    expected = _ema_state_dict(cfg, shadow)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert any(not torch.equal(expected[k], model_sd[k]) for k in expected)  # EMA != raw weights
    raw = load_ncsnpp(path, config=cfg, use_ema=False, return_net=True)
    for name, p in raw.named_parameters():
        assert torch.equal(p, model_sd[name]), name
    assert not loaded.training


@pytest.mark.parametrize("fmt", ["safetensors", "model_and_ema_dict", "plain_state_dict"])
def test_ema_weights_from_safetensors_and_plain_dicts(tmp_path, fmt):
    cfg = ncsnpp_small()
    model_sd, shadow = _score_sde_checkpoint(tmp_path / "checkpoint_8.pth", cfg)
    ema_sd = _ema_state_dict(cfg, shadow)
    if fmt == "safetensors":  # the conversion the docstring gives
        from safetensors.torch import save_file
        path = tmp_path / "ema.safetensors"
        save_file(load_ncsnpp(tmp_path / "checkpoint_8.pth", config=cfg, return_net=True).state_dict(), str(path))
    elif fmt == "model_and_ema_dict":
        path = tmp_path / "model_ema.pth"
        torch.save({"model": {"module." + k: v for k, v in model_sd.items()},
                    "ema": {"shadow_params": shadow}}, path)
    else:  # already-EMA weights, DataParallel prefix, the official sigmas buffer
        path = tmp_path / "ema_state_dict.pth"
        torch.save({"module." + k: v for k, v in {**ema_sd, "sigmas": model_sd["sigmas"]}.items()}, path)
    loaded = load_ncsnpp(path, config=cfg, return_net=True)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema_sd[name]), name


def test_use_ema_without_an_ema_entry_says_what_to_do(tmp_path):
    cfg = ncsnpp_small()
    model_sd, _ = _score_sde_checkpoint(tmp_path / "ck.pth", cfg)
    path = tmp_path / "model_only.pth"
    torch.save({"model": model_sd, "step": 3}, path)
    with pytest.raises(ValueError, match=r"'ema' entry.*use_ema=False"):
        load_ncsnpp(path, config=cfg)
    net = load_ncsnpp(path, config=cfg, use_ema=False, return_net=True)
    assert all(torch.equal(p, model_sd[n]) for n, p in net.named_parameters())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_score_sde_checkpoint_with_code_is_refused_naming_the_global(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint_8.pth"
    _score_sde_checkpoint(path, ncsnpp_small(), extra={"config": _Payload(marker)})
    with pytest.raises(ValueError, match=rf"refused.*GLOBAL {os.system.__module__}\.system"):
        load_ncsnpp(path, config=ncsnpp_small())
    assert not marker.exists()


def test_garbage_file_is_reported_as_damaged(tmp_path):
    path = tmp_path / "checkpoint_8.pth"
    path.write_bytes(bytes(range(1, 200)))
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_ncsnpp(path, config=ncsnpp_small())
    good = tmp_path / "good.pth"
    _score_sde_checkpoint(good, ncsnpp_small())
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_ncsnpp(path, config=ncsnpp_small())


def test_score_wrapper_and_shapes(tmp_path):
    cfg = ncsnpp_small()
    path = tmp_path / "ck.pth"
    _score_sde_checkpoint(path, cfg)
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
    _score_sde_checkpoint(path, ncsnpp_small())
    with pytest.raises(ValueError, match=r"(?s)NCSN\+\+.*(missing|shape)"):
        load_ncsnpp(path)  # expects the full deep config
    other = tmp_path / "wrn.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(16, 3, 3, 3)}}, other)
    with pytest.raises(ValueError, match=r"missing.*unexpected.*conv1\.weight"):
        load_ncsnpp(other, config=ncsnpp_small())
    bare = tmp_path / "bare.pth"  # a plain state dict of something else: its keys are named
    torch.save({"conv1.weight": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match=r"missing.*all_modules.*unexpected.*conv1\.weight"):
        load_ncsnpp(bare)
    neither = tmp_path / "neither.pth"
    torch.save({"weights": [torch.zeros(1)], "step": 3}, neither)
    with pytest.raises(ValueError, match="'model' entry.*plain NCSN\\+\\+ state dict"):
        load_ncsnpp(neither)


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
