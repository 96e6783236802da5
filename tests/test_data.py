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


def _write_tar(path, members: dict):
    """A .tar.gz holding `members` {member path: bytes}, in that order."""
    import io

    with tarfile.open(path, "w:gz", compresslevel=1) as t:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return str(path)


def _batch(data, labels):
    return pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": list(labels), b"data": data,
                         b"filenames": [b"img_%05d.png" % i for i in range(len(labels))]}, protocol=2)


def test_paper_subset_is_diffpures_numpy_choice(tmp_path):
    """The default subset is DiffPure's cifar10_dataset_sub: RandomState(data_seed).choice(10000, 512), in order."""
    index = np.arange(10_000)
    data = np.zeros((10_000, 3072), dtype=np.uint8)
    data[:, 0], data[:, 1] = index // 256, index % 256  # the first two red pixels spell the image's index
    path = _write_tar(tmp_path / "cifar-10-python.tar.gz",
                      {"cifar-10-batches-py/test_batch": _batch(data, index % 10)})

    def indices(x):
        return (np.rint(x[:, 0, 0, 0].numpy() * 255) * 256 + np.rint(x[:, 0, 0, 1].numpy() * 255)).astype(int)

    x, y = load_cifar(path)  # the defaults: test split, n = 512, seed = 0, subset "paper"
    want = np.random.RandomState(0).choice(10_000, 512, replace=False)
    assert x.shape == (512, 3, 32, 32) and indices(x).tolist() == want.tolist()
    assert y.tolist() == (want % 10).tolist()
    x, _ = load_cifar(path, n=64, seed=7, subset="paper")
    assert indices(x).tolist() == np.random.RandomState(7).choice(10_000, 64, replace=False).tolist()
    # "seeded" keeps the torch permutation subset
    x, _ = load_cifar(path, n=64, seed=7, subset="seeded")
    assert indices(x).tolist() == torch.randperm(10_000, generator=torch.Generator().manual_seed(7))[:64].tolist()


@pytest.mark.parametrize("subset,seed", [("random", 0), ("paper", -1), ("paper", 2**32), ("paper", 1.5),
                                         ("seeded", 2**64)])
def test_subset_and_seed_are_validated(tmp_path, subset, seed):
    path, _ = make_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="^subset" if subset == "random" else "^seed"):
        load_cifar(path, "test", n=5, seed=seed, subset=subset)


def test_archive_members_are_matched_by_their_real_path(tmp_path):
    real, decoy = np.full((4, 3072), 7, np.uint8), np.full((4, 3072), 200, np.uint8)
    # a same-named file in another folder, after the real one: it used to win (last basename match)
    path = _write_tar(tmp_path / "a.tar.gz", {"cifar-10-batches-py/test_batch": _batch(real, [1, 2, 3, 4]),
                                              "elsewhere/test_batch": _batch(decoy, [0, 0, 0, 0])})
    x, y = load_cifar(path, n=None)
    assert y.tolist() == [1, 2, 3, 4] and torch.all(x == 7 / 255)
    # a leading "./" is how some re-packed archives name them
    path = _write_tar(tmp_path / "b.tar.gz", {"./cifar-10-batches-py/test_batch": _batch(real, [1, 2, 3, 4])})
    assert load_cifar(path, n=None)[1].tolist() == [1, 2, 3, 4]
    # the right name in the wrong folder alone is not CIFAR
    path = _write_tar(tmp_path / "c.tar.gz", {"elsewhere/test_batch": _batch(decoy, [0, 0, 0, 0])})
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/test_batch"):
        load_cifar(path, n=None)
    # and the same path twice is ambiguous
    path = _write_tar(tmp_path / "d.tar.gz", {"cifar-10-batches-py/test_batch": _batch(real, [1, 2, 3, 4]),
                                              "./cifar-10-batches-py/test_batch": _batch(decoy, [0, 0, 0, 0])})
    with pytest.raises(ValueError, match="twice"):
        load_cifar(path, n=None)


LIMIT = 10_000 * (3072 + 128)  # the largest test_batch accepted (the real one: 31,035,704 bytes)


def test_oversized_archive_member_is_refused_before_it_is_read(tmp_path):
    path = _write_tar(tmp_path / "big.tar.gz", {"cifar-10-batches-py/test_batch": bytes(LIMIT + 1)})
    with pytest.raises(ValueError, match="member cifar-10-batches-py/test_batch: 32,000,001 bytes, larger than"):
        load_cifar(path, n=None)


def test_oversized_file_in_a_directory_is_refused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        f.truncate(LIMIT + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="test_batch: 32,000,001 bytes, larger than any real CIFAR file"):
        load_cifar(str(tmp_path), n=None)
