"""WideResNets in RobustBench's state-dict formats: layouts, sizes, loading, errors."""
import pytest
import torch

from coup_fast.models.wideresnet import DMWideResNet, WideResNet, load_wideresnet




def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_and_key_names():
    with torch.device("meta"):
        wrn28 = WideResNet(28, 10)
        wrn70 = DMWideResNet(70, 16)
    assert abs(_count(wrn28) - 36.5e6) / 36.5e6 < 0.005, _count(wrn28)
    assert abs(_count(wrn70) - 266.8e6) / 266.8e6 < 0.005, _count(wrn70)
    k28 = set(wrn28.state_dict())
    for k in ["conv1.weight", "block1.layer.0.bn1.running_var", "block1.layer.0.convShortcut.weight",
              "block2.layer.3.conv2.weight", "bn1.weight", "fc.weight", "fc.bias"]:
        assert k in k28, k
    assert "block1.layer.1.convShortcut.weight" not in k28
    k70 = set(wrn70.state_dict())
    for k in ["mean", "std", "init_conv.weight", "layer.0.block.0.batchnorm_0.weight",
              "layer.0.block.0.shortcut.weight", "layer.2.block.10.conv_1.weight",
              "batchnorm.running_mean", "logits.weight"]:
        assert k in k70, k
    assert "layer.0.block.1.shortcut.weight" not in k70


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model_state_dict", "safetensors"])
def test_round_trip_robustbench_layout(tmp_path, wrapper):
    torch.manual_seed(0)
    ref = WideResNet(16, 2).eval()  # narrow variant of the WRN-28-10 layout
    _randomize_bn(ref)
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    if wrapper == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "wrn.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "wrn.pt"
        torch.save(sd if wrapper == "raw" else {wrapper: sd, "epoch": 3}, path)
    model = load_wideresnet(path, depth=16, widen=2)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert model(x).shape == (3, 10) and not model.training


def test_round_trip_dm_layout_and_missing_mean_std(tmp_path):
    torch.manual_seed(0)
    ref = DMWideResNet(16, 2, activation="silu").eval()  # narrow variant of the WRN-70-16 layout
    _randomize_bn(ref)
    path = tmp_path / "dm.pt"
    torch.save(ref.state_dict(), path)
    model = load_wideresnet(path, depth=16, widen=2, layout="dm")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # older files without the normalisation buffers fall back to the CIFAR-10 statistics
    sd = {k: v for k, v in ref.state_dict().items() if k not in ("mean", "std")}
    torch.save(sd, path)
    with torch.no_grad():
        torch.testing.assert_close(load_wideresnet(path, depth=16, widen=2, layout="dm")(x), ref(x))


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "wrn.pt"
    torch.save(WideResNet(16, 2).state_dict(), path)
    with pytest.raises(ValueError, match=r"DMWideResNet-16-2.*missing keys.*init_conv"):
        load_wideresnet(path, depth=16, widen=2, layout="dm")
    with pytest.raises(ValueError, match=r"WideResNet-22-2.*missing keys"):
        load_wideresnet(path, depth=22, widen=2)
    with pytest.raises(ValueError, match=r"shape mismatch.*WideResNet-16-4"):
        load_wideresnet(path, depth=16, widen=4)
    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match="state dict"):
        load_wideresnet(bad)


class _NotATensor:
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": WideResNet(16, 2).state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_wideresnet(path, depth=16, widen=2)


def test_dm_layout_without_statistics_uses_the_data_sets(tmp_path):
    # DeepMind files without mean/std buffers: CIFAR-100 models normalise with CIFAR-100's statistics
    from coup_fast.models.wideresnet import CIFAR10_MEAN, CIFAR100_MEAN, CIFAR100_STD

    for n_classes, mean in ((10, CIFAR10_MEAN), (100, CIFAR100_MEAN)):
        sd = {k: v for k, v in DMWideResNet(16, 2, n_classes).state_dict().items() if k not in ("mean", "std")}
        path = tmp_path / f"dm{n_classes}.pt"
        torch.save(sd, path)
        model = load_wideresnet(path, depth=16, widen=2, layout="dm", num_classes=n_classes)
        torch.testing.assert_close(model.mean.flatten(), torch.tensor(mean))
        if n_classes == 100:
            torch.testing.assert_close(model.std.flatten(), torch.tensor(CIFAR100_STD))
