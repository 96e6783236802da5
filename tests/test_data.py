"""coup_fast.data: CIFAR python-version archives (generated here) and sklearn digits."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from coup_fast.data import load_cifar, load_digits




def make_fake_cifar(root, dataset="cifar10", n_per_file=20, tar=False, seed=0):
    """Write a tiny CIFAR archive in the exact python-version format.

    Each batch is a pickled dict {b'data': uint8 (N, 3072), b'labels' | b'fine_labels': list}.
    Returns (path to pass to load_cifar, {file name: (data, labels)}).
    """
    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        sub, names, key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
        n_cls = 10
    else:
        sub, names, key = "cifar-100-python", ["train", "test"], b"fine_labels"
        n_cls = 100
    content = {}
    blobs = {}
    for name in names:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_cls, size=n_per_file).tolist()
        d = {b"batch_label": b"fake", b"data": data, key: labels, b"filenames": [b"x.png"] * n_per_file}
        if dataset == "cifar100":
            d[b"coarse_labels"] = [0] * n_per_file
        blobs[name] = pickle.dumps(d, protocol=2)
        content[name] = (data, labels)
    d = os.path.join(root, sub)
    os.makedirs(d)
    for name, b in blobs.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(b)
    if not tar:
        return d, content
    path = os.path.join(root, f"{dataset}-python.tar.gz")
    with tarfile.open(path, "w:gz") as t:
        t.add(d, arcname=sub)
    return path, content


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10_full_split_matches_file(tmp_path, tar):
    path, content = make_fake_cifar(str(tmp_path), tar=tar)
    x, y = load_cifar(path, split="test", n=None)
    data, labels = content["test_batch"]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels
    assert 0.0 <= x.min() and x.max() <= 1.0
    # channel-major rows: first 1024 values are the red plane
    np.testing.assert_allclose(x[3, 0].numpy().ravel(), data[3, :1024] / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(x[3, 2].numpy().ravel(), data[3, 2048:] / 255.0, rtol=0, atol=1e-7)
    xt, yt = load_cifar(path, split="train", n=None)
    assert xt.shape[0] == 100 and yt.tolist() == sum((content[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_cifar_parent_directory_and_subset_determinism(tmp_path):
    make_fake_cifar(str(tmp_path))
    x1, y1 = load_cifar(str(tmp_path), split="train", n=7, seed=3)   # parent dir accepted
    x2, y2 = load_cifar(str(tmp_path), split="train", n=7, seed=3)
    x3, _ = load_cifar(str(tmp_path), split="train", n=7, seed=4)
    assert x1.shape == (7, 3, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


@pytest.mark.parametrize("tar", [False, True])
def test_cifar100(tmp_path, tar):
    path, content = make_fake_cifar(str(tmp_path), dataset="cifar100", tar=tar)
    x, y = load_cifar(path, split="test", n=None, dataset="cifar100")
    assert x.shape == (20, 3, 32, 32) and y.tolist() == content["test"][1]


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor"):
        load_cifar(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not contain"):
        load_cifar(str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        load_cifar(str(tmp_path), split="val")


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar(str(tmp_path), split="test")


def test_digits_fixed_split():
    xte, yte = load_digits("test")
    xtr, ytr = load_digits("train")
    assert xte.shape == (300, 1, 8, 8) and xtr.shape == (1497, 1, 8, 8)
    assert xte.dtype == torch.float32 and yte.dtype == torch.int64
    assert 0.0 <= xte.min() and xte.max() <= 1.0 and xtr.max() == 1.0
    x2, y2 = load_digits("test")
    assert torch.equal(xte, x2) and torch.equal(yte, y2)
    xa, _ = load_digits("all")
    # the two splits partition the 1797 images
    assert xtr.shape[0] + xte.shape[0] == xa.shape[0] == 1797
    assert sorted(set(yte.tolist())) == list(range(10))


def _rewrite_test_batch(path, changes: dict):
    name = os.path.join(path, "test_batch")
    with open(name, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d.update(changes)
    with open(name, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.mark.parametrize("change,match", [
    (lambda d, lab: {b"labels": lab[:-1]}, "labels"),                        # one label short
    (lambda d, lab: {b"labels": [10] + lab[1:]}, "labels in"),               # a class that does not exist
    (lambda d, lab: {b"data": d.astype(np.float32) / 255}, "uint8"),          # re-saved as floats
])
def test_malformed_batches_are_refused(tmp_path, change, match):
    path, content = make_fake_cifar(tmp_path)
    _rewrite_test_batch(path, change(*content["test_batch"]))
    with pytest.raises(ValueError, match=match):
        load_cifar(path, "test")


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_subset_size_is_validated(tmp_path, n):
    path, _ = make_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="n must be None or an integer >= 1"):
        load_cifar(path, "test", n=n)


def test_digits_subsets_are_seeded_and_bounded():
    x, y = load_digits("test")
    xs, ys = load_digits("test", n=40, seed=3)
    assert xs.shape == (40, 1, 8, 8) and torch.equal(xs, load_digits("test", n=40, seed=3)[0])
    rows = {tuple(r.flatten().tolist()): lab for r, lab in zip(x, y.tolist())}
    assert all(rows[tuple(r.flatten().tolist())] == lab for r, lab in zip(xs, ys.tolist()))  # pairs kept
    assert torch.equal(load_digits("test", n=300)[0], x)  # the whole split, in order
    for bad in (0, 301, -3, 2.5):
        with pytest.raises(ValueError, match="n_images: the digits test split has 300 images"):
            load_digits("test", n=bad)
