"""WideResNets in the RobustBench, DiffPure and DeepMind state-dict formats: layouts, sizes,
loading, layout detection, errors."""
import pytest
import torch

from coup_fast.models.wideresnet import DiffPureWideResNet, DMWideResNet, WideResNet, load_wideresnet


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
    with pytest.raises(ValueError, match=r"layout='dm' does not fit.*TRADES.*'robustbench'.*'diffpure'.*'dm'"):
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
        model = load_wideresnet(path, depth=16, widen=2)  # layout and class count read from the file
        torch.testing.assert_close(model.mean.flatten(), torch.tensor(mean))
        if n_classes == 100:
            torch.testing.assert_close(model.std.flatten(), torch.tensor(CIFAR100_STD))


# ---- forward against a functional re-derivation from the state dict (the published block structure)
def _bn(x, sd, p):
    return torch.nn.functional.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                                          sd[p + ".bias"], False, 0.0, 1e-5)


def _robustbench_reference(sd, u, n_blocks):
    """Zagoruyko & Komodakis' pre-activation WRN as RobustBench writes it: per block
    o = relu(bn1(x)), y = conv2(relu(bn2(conv1(o)))), out = (x or convShortcut(o)) + y."""
    F = torch.nn.functional
    h = F.conv2d(u, sd["conv1.weight"], padding=1)
    for g, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n_blocks):
            p = f"block{g}.layer.{i}."
            o = F.relu(_bn(h, sd, p + "bn1"))
            s = stride if i == 0 else 1
            y = F.conv2d(F.relu(_bn(F.conv2d(o, sd[p + "conv1.weight"], stride=s, padding=1), sd, p + "bn2")),
                         sd[p + "conv2.weight"], padding=1)
            short = sd.get(p + "convShortcut.weight")
            h = (h if short is None else F.conv2d(o, short, stride=s)) + y
    h = F.relu(_bn(h, sd, "bn1"))
    return F.linear(h.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _dm_reference(sd, u, n_blocks):
    """DeepMind's WRN: normalise, then per block a = swish(bn_0(x)), TF 'SAME' padding (bottom/right
    only at stride 2), out = (x or shortcut(a)) + conv_1(swish(bn_1(conv_0(pad(a)))))."""
    F = torch.nn.functional
    h = F.conv2d((u - sd["mean"]) / sd["std"], sd["init_conv.weight"], padding=1)
    for g, stride in ((0, 1), (1, 2), (2, 2)):
        for i in range(n_blocks):
            p = f"layer.{g}.block.{i}."
            s = stride if i == 0 else 1
            a = F.silu(_bn(h, sd, p + "batchnorm_0"))
            v = F.pad(a, (1, 1, 1, 1) if s == 1 else (0, 1, 0, 1))
            y = F.conv2d(F.silu(_bn(F.conv2d(v, sd[p + "conv_0.weight"], stride=s), sd, p + "batchnorm_1")),
                         sd[p + "conv_1.weight"], padding=1)
            short = sd.get(p + "shortcut.weight")
            h = (h if short is None else F.conv2d(a, short, stride=s)) + y
    h = F.silu(_bn(h, sd, "batchnorm"))
    return F.linear(h.mean((2, 3)), sd["logits.weight"], sd["logits.bias"])


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics and affine terms away from identity, so each one matters
        for name, t in model.state_dict().items():
            if t.is_floating_point() and name not in ("mean", "std"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3 + (1.0 if name.endswith("var") else 0.0))
                if name.endswith("var"):
                    t.abs_().add_(0.1)
    return model.eval()


@pytest.mark.parametrize("layout", ["robustbench", "dm"])
def test_forward_matches_the_published_block_structure(layout):
    model = _randomized(WideResNet(16, 2) if layout == "robustbench" else DMWideResNet(16, 2))
    sd = {k: v.double() for k, v in model.state_dict().items()}
    u = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = (_robustbench_reference if layout == "robustbench" else _dm_reference)(sd, u, n_blocks=2)
    torch.testing.assert_close(model.double()(u), reference, rtol=1e-10, atol=1e-10)


# ---- each layout through the loader, against its published definition
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # DiffPure's classifiers/cifar10_resnet.py
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _diffpure_reference(sd, u, n_blocks):
    """DiffPure's WideResNet: the TRADES network applied to (u - mean) / std, where mean/std are
    plain float32 tensor attributes (torch.tensor(mean).view(3, 1, 1)), not state-dict entries."""
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1).to(u.dtype)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1).to(u.dtype)
    return _robustbench_reference(sd, (u - mean) / std, n_blocks)


def _diffpure_weights_file(path, depth, widen, num_classes=10):
    """A file as DiffPure ships weights.pt: a raw state dict saved from DataParallel ('module.'
    keys, which its update_state_dict strips), TRADES key names, no mean/std entries."""
    sd = _randomized(WideResNet(depth, widen, num_classes)).state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    return {k: v.double() for k, v in sd.items()}


@pytest.mark.parametrize("layout, depth, widen, passed_layout", [
    ("robustbench", 16, 2, None),
    ("diffpure", 10, 2, "diffpure"),
    ("diffpure", 70, 1, None),       # depth 70 with TRADES keys: DiffPure's WRN-70-16(-dropout) by default
    ("robustbench", 70, 1, "robustbench"),
    ("dm", 16, 2, None),              # DeepMind keys detected
])
def test_each_layout_loads_to_its_published_definition(tmp_path, layout, depth, widen, passed_layout):
    path = tmp_path / "weights.pt"
    n_blocks = (depth - 4) // 6
    if layout == "dm":
        sd = _randomized(DMWideResNet(depth, widen)).state_dict()
        torch.save(sd, path)
        sd = {k: v.double() for k, v in sd.items()}
    else:
        sd = _diffpure_weights_file(path, depth, widen)
    model = load_wideresnet(path, depth=depth, widen=widen, layout=passed_layout)
    assert type(model) is {"robustbench": WideResNet, "diffpure": DiffPureWideResNet, "dm": DMWideResNet}[layout]
    assert not model.training
    assert ("mean" in model.state_dict()) == (layout == "dm")  # DiffPure's statistics are not state
    u = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = {"robustbench": _robustbench_reference, "diffpure": _diffpure_reference,
                 "dm": _dm_reference}[layout](sd, u, n_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(u), reference, rtol=1e-10, atol=1e-10)


def test_diffpure_and_robustbench_layouts_really_differ(tmp_path):
    path = tmp_path / "weights.pt"
    sd = _diffpure_weights_file(path, 10, 2)
    u = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        as_diffpure = load_wideresnet(path, depth=10, widen=2, layout="diffpure").double()(u)
        as_robustbench = load_wideresnet(path, depth=10, widen=2, layout="robustbench").double()(u)
    torch.testing.assert_close(as_robustbench, _robustbench_reference(sd, u, 1), rtol=1e-10, atol=1e-10)
    assert (as_diffpure - as_robustbench).abs().max() > 0.1 * as_robustbench.abs().max()


def test_diffpure_normalisation_is_real_after_a_meta_build_and_not_in_the_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    _diffpure_weights_file(path, 10, 1)
    model = load_wideresnet(path, depth=10, widen=1, layout="diffpure")
    assert not any(k in model.state_dict() for k in ("mean", "std"))
    assert model.mean.device.type == "cpu" and model.mean.flatten().tolist() == torch.tensor(CIFAR10_MEAN).tolist()
    model.load_state_dict(WideResNet(10, 1).state_dict(), strict=True)  # DiffPure's keys, exactly


def test_layout_errors_list_the_layouts_and_the_key_family(tmp_path):
    trades = tmp_path / "trades.pt"
    _diffpure_weights_file(trades, 10, 1)
    deepmind = tmp_path / "dm.pt"
    torch.save(DMWideResNet(10, 1).state_dict(), deepmind)
    with pytest.raises(ValueError, match=r"layout='diffpure' does not fit.*DeepMind family.*\['dm'\]"):
        load_wideresnet(deepmind, depth=10, widen=1, layout="diffpure")
    with pytest.raises(ValueError, match=r"layout='dm' does not fit.*TRADES family.*\['robustbench', 'diffpure'\]"):
        load_wideresnet(trades, depth=10, widen=1, layout="dm")
    with pytest.raises(ValueError, match=r"layout must be one of \['robustbench', 'diffpure', 'dm'\].*'trades'"):
        load_wideresnet(trades, depth=10, widen=1, layout="trades")
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=r"neither TRADES keys.*nor DeepMind keys.*encoder.weight"):
        load_wideresnet(other)
    with pytest.raises(ValueError, match=r"activation applies to layout='dm' only"):
        load_wideresnet(trades, depth=10, widen=1, activation="silu")


@pytest.mark.parametrize("layout", ["diffpure", "dm"])
def test_num_classes_is_read_from_the_file_and_checked(tmp_path, layout):
    path = tmp_path / "c100.pt"
    if layout == "dm":
        torch.save(DMWideResNet(10, 1, num_classes=100).state_dict(), path)
    else:
        _diffpure_weights_file(path, 10, 1, num_classes=100)
    model = load_wideresnet(path, depth=10, widen=1, layout=layout)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    head = "logits.weight" if layout == "dm" else "fc.weight"
    with pytest.raises(ValueError, match=rf"num_classes=10, but .* has 100 classes \({head}"):
        load_wideresnet(path, depth=10, widen=1, layout=layout, num_classes=10)
