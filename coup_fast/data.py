"""Evaluation data: CIFAR-10/100 from a local archive, and sklearn's 8x8 digits.

Nothing here downloads anything.  CIFAR must already be on disk in the standard
"python version" format (https://www.cs.toronto.edu/~kriz/cifar.html):

- CIFAR-10:  ``cifar-10-batches-py/{data_batch_1..5, test_batch}``
- CIFAR-100: ``cifar-100-python/{train, test}``

either as the extracted directory or as the original ``.tar.gz``.  Each file is a
pickled dict with ``b'data'`` (uint8, (N, 3072), channel-major RGB 32x32) and
``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100).  From an archive only the members
at exactly those paths are read (optionally with a leading ``./``), never a same-named file in
another folder; a member or file larger than the real one can be (see ``_MAX_BYTES_PER_IMAGE``)
is refused before it is read.

The default CIFAR subset is the paper's: ``np.random.RandomState(0).choice(10000, 512,
replace=False)`` of the test set, in that order, the images DiffPure and COUP evaluate
(``load_cifar(..., subset="paper")``).

Security: those files are pickles, and unpickling an untrusted pickle can execute arbitrary code
or, through lists shared in its memo, describe far more elements than it holds.  They are read by
:func:`coup_fast._cifar_pickle.read_cifar_pickle`, which builds the structures the real files
contain and nothing else, within bounds set by the number of images.  An archive is streamed, and
at most ``_MAX_ARCHIVE_MEMBERS`` member headers are read.

All returned images are float32 in **[0, 1], NCHW**; labels int64.
"""
from __future__ import annotations

import os
import tarfile

import numpy as np
import torch

from ._cifar_pickle import CifarPickleError, read_cifar_pickle

__all__ = ["load_cifar", "load_digits", "DIGITS_SPLIT", "CIFAR_SUBSETS"]

_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
_LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}
_SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# Images in each real file: CIFAR-10's batches and CIFAR-100's test file hold 10,000, CIFAR-100's
# train file 50,000.
_IMAGES_PER_FILE = {"cifar10": dict.fromkeys(_FILES["cifar10"]["train"] + ["test_batch"], 10_000),
                    "cifar100": {"train": 50_000, "test": 10_000}}
# A real file is its images' 3072 pixel bytes each plus about 32 bytes per image of labels, file
# names and pickle framing (data_batch_1: 31,035,704 bytes; cifar-100-python/train: about 155 MB).
# 128 bytes per image leaves a wide margin for re-pickled copies; anything larger is not a CIFAR
# file, and reading it whole could exhaust memory.
_MAX_BYTES_PER_IMAGE = 3072 + 128
# load_cifar's image subsets: "paper" is DiffPure's and COUP's numpy choice, "seeded" a torch permutation.
CIFAR_SUBSETS = ("paper", "seeded")


def _too_large(what: str, limit: int, size: int | None = None) -> ValueError:
    got = f"{size:,} bytes, " if size is not None else ""
    return ValueError(f"{what}: {got}larger than any real CIFAR file ({limit:,} bytes at most); refusing to read it")


def _read_bounded(f, limit: int, what: str, size: int) -> bytes:
    """All of file object f, whose stated size is `size`, refusing more than `limit` bytes (`what`
    names it in the error).  The stated size is checked before a byte is read, the bytes read after."""
    if size > limit:
        raise _too_large(what, limit, size)
    data = f.read(limit + 1)  # + 1: a file that grew past its stated size is still seen as too long
    if len(data) > limit:
        raise _too_large(what, limit)
    return data


def _read_members(path: str, names: list[str], dataset: str) -> list[tuple[str, bytes]]:
    """(where, raw bytes) of each named batch file, from a directory or a .tar.gz / .tar.xz."""
    limits = {n: _IMAGES_PER_FILE[dataset][n] * _MAX_BYTES_PER_IMAGE for n in names}
    if os.path.isdir(path):
        return _read_directory(path, names, dataset, limits)
    if os.path.isfile(path):
        return _read_archive(path, names, dataset, limits)
    raise FileNotFoundError(
        f"CIFAR path {path!r} is neither a directory nor a .tar.gz archive; "
        f"download the {dataset} 'python version' yourself and pass its location")


def _read_directory(path: str, names: list[str], dataset: str, limits: dict) -> list[tuple[str, bytes]]:
    # Accept either the batch directory itself or its parent.
    folders = (path, os.path.join(path, _SUBDIR[dataset]))
    missing = {d: [n for n in names if not os.path.isfile(os.path.join(d, n))] for d in folders}
    for d in folders:
        if not missing[d]:
            out = []
            for n in names:
                file = os.path.join(d, n)
                with open(file, "rb") as f:
                    out.append((file, _read_bounded(f, limits[n], file, os.fstat(f.fileno()).st_size)))
            return out
    # Every file the split lacks, in one message: the folder that holds some of them, else both places.
    partial = [d for d in folders if len(missing[d]) < len(names)]
    if partial:
        d = partial[0]
        raise FileNotFoundError(f"{d!r} does not contain the {dataset} python-version files {missing[d]} "
                                f"({len(missing[d])} of the {len(names)} files of the {dataset} split)")
    raise FileNotFoundError(
        f"{path!r} does not contain the {dataset} python-version files {names} "
        f"(expected them directly or under {_SUBDIR[dataset]}/)")


# A CIFAR archive has 9 members (CIFAR-10: the folder, 6 batches, batches.meta, readme.html) or 5
# (CIFAR-100) and unpacks to under 200 MB.  A stream of member headers is read up to these bounds:
# past them it is not a CIFAR archive, and a few kilobytes of .tar.xz can hold a million tiny members
# or a header that unpacks to gigabytes.
_MAX_ARCHIVE_MEMBERS = 1000
_MAX_ARCHIVE_BYTES = 1 << 30
_MAX_HEADER_BYTES = 1 << 16  # a GNU long name or a pax header: a path is a few hundred bytes


class _ArchiveRefused(ValueError):
    pass


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a long-name or pax header's whole declared size, and an old-GNU sparse map's
    chain of blocks, into memory before it returns the member: bound the one, refuse the other
    (``_proc_member`` is tarfile's documented hook for this)."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > _MAX_HEADER_BYTES:
            raise _ArchiveRefused(f"a {self.size:,}-byte extended header (at most {_MAX_HEADER_BYTES:,})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _ArchiveRefused("a sparse member: the CIFAR archives hold none")
        return super()._proc_member(tar)

    def _proc_gnusparse_10(self, *args):  # a pax sparse map, read from the member's data blocks
        raise _ArchiveRefused("a sparse member: the CIFAR archives hold none")


def _read_archive(path: str, names: list[str], dataset: str, limits: dict) -> list[tuple[str, bytes]]:
    """Stream the archive's members once, keeping the bytes of those at the archive's own paths
    (e.g. cifar-10-batches-py/test_batch, optionally with a leading './').  Every header is read,
    to see a path that appears twice, up to the bounds above."""
    wanted = {f"{_SUBDIR[dataset]}/{n}": n for n in names}
    found, out, headers, declared = {}, {}, 0, 0
    try:
        with tarfile.open(path, "r|*", tarinfo=_BoundedTarInfo) as tar:
            for member in iter(tar.next, None):
                headers += 1
                declared += member.size
                if headers > _MAX_ARCHIVE_MEMBERS:
                    lacking = [w for w in wanted if w not in found]
                    raise ValueError(
                        f"archive {path!r}: stopped after {_MAX_ARCHIVE_MEMBERS:,} member headers"
                        + (f" without finding {lacking}" if lacking else "")
                        + f": a {dataset} archive has fewer than 10 members; refusing to read further")
                if declared > _MAX_ARCHIVE_BYTES:
                    raise ValueError(
                        f"archive {path!r}: stopped at member {_clip(member.name)!r}, where the members' "
                        f"sizes pass {_MAX_ARCHIVE_BYTES:,} bytes: a {dataset} archive unpacks to under "
                        "200 MB; refusing to read further")
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted:
                    continue
                if not member.isfile():
                    raise ValueError(f"archive {path!r}: member {member.name!r} is not a regular file")
                if name in found:
                    raise ValueError(f"archive {path!r} holds {name!r} twice ({found[name]!r}, "
                                     f"{member.name!r}): refusing to choose one")
                found[name] = member.name
                # Read the member's bytes now, as the stream passes it: nothing is extracted to disk.
                # The size is the header's: a too-large member is refused before a byte is decompressed.
                out[name] = _read_bounded(tar.extractfile(member), limits[wanted[name]],
                                          f"{path}: member {member.name}", member.size)
    except _ArchiveRefused as e:
        raise ValueError(f"archive {path!r}: {e}; refusing to read further") from None
    except RecursionError:  # tarfile reads a chain of extended headers recursively
        raise ValueError(f"archive {path!r}: a chain of extended headers hundreds long after {headers} members; "
                         "refusing to read further") from None
    except tarfile.TarError as e:
        if headers == 0:
            raise FileNotFoundError(f"CIFAR path {path!r} is neither a directory nor a .tar.gz archive ({e}); "
                                    f"download the {dataset} 'python version' yourself and pass its location") from None
        raise ValueError(f"archive {path!r}: damaged after {headers} members ({e})") from None
    except EOFError as e:  # a compressed stream that ends early
        raise ValueError(f"archive {path!r}: truncated after {headers} members ({e})") from None
    missing = [w for w in wanted if w not in found]
    if missing:
        raise FileNotFoundError(f"archive {path!r} lacks the {dataset} members {missing} "
                                "(the paths of the original archive, optionally with a leading './')")
    return [(f"{path}: member {found[w]}", out[w]) for w in wanted]


def _read_batch(where: str, raw: bytes, dataset: str, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (N, 3072), labels int64 (N,)) of one batch file's bytes; `where` names it."""
    try:
        d = read_cifar_pickle(raw, max_images)
    except CifarPickleError as e:
        raise CifarPickleError(f"{where}: {e}") from None
    key, n_classes = _LABEL_KEY[dataset], (100 if dataset == "cifar100" else 10)
    if b"data" not in d or key not in d:
        raise ValueError(f"{where}: a {dataset} batch holds b'data' and {key!r}; this one holds "
                         f"{_clip(repr(list(d)))}")
    data, labels = d[b"data"], d[key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise ValueError(f"{where}: expected b'data' of uint8 pixels, shape (N, 3072), got {got}")
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"{len(labels)} labels" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise ValueError(f"{where}: expected {key!r} to be a list of {len(data)} labels, one per image; got {got}")
    # Only ints: a float label (3.7) would be truncated to a class silently, a bool is no class.
    bad = next((i for i, v in enumerate(labels) if type(v) is not int or not 0 <= v < n_classes), None)
    if bad is not None:
        raise ValueError(f"{where}: {key!r}[{bad}] is {_clip(repr(labels[bad]))}: expected labels in "
                         f"[0, {n_classes}), as integers")
    return data, np.array(labels, dtype=np.int64)


def load_cifar(path: str, split: str = "test", n: int | None = 512, seed: int = 0,
               dataset: str = "cifar10", subset: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a subset of CIFAR-10/100 from a local python-version archive.

    Args:
        path: the extracted directory (or its parent) or the ``.tar.gz``.
        split: "train" or "test".
        n: subset size (512 as in the paper's evaluation); None or >= size for all,
            in the original order.
        seed: seed of the subset (a fixed seed gives the same subset); DiffPure's ``data_seed``.
        dataset: "cifar10" or "cifar100".
        subset: "paper" (default): ``np.random.RandomState(seed).choice(size, n, replace=False)``,
            in that order, as DiffPure's ``data.cifar10_dataset_sub`` picks (and torch's
            ``Subset`` orders) the images DiffPure and COUP evaluate: with n = 512, seed = 0, the
            paper's CIFAR-10 test images.  seed must then lie in [0, 2**32 - 1].
            "seeded": the first n of ``torch.randperm(size)`` under ``manual_seed(seed)``.

    Returns:
        x: float32 (n, 3, 32, 32) in [0, 1];  y: int64 (n,).
    """
    if dataset not in _FILES:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be None or an integer >= 1, got {n!r}")
    if subset not in CIFAR_SUBSETS:
        raise ValueError(f"subset must be one of {CIFAR_SUBSETS}, got {subset!r}")
    # numpy's RandomState takes seeds in [0, 2**32); torch's generator in [-2**63, 2**64)
    seed_range = (0, 2**32 - 1) if subset == "paper" else (-(2**63), 2**64 - 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not seed_range[0] <= seed <= seed_range[1]:
        raise ValueError(f"seed must be an integer in [{seed_range[0]}, {seed_range[1]}] for subset={subset!r}, "
                         f"got {seed!r}")
    names = _FILES[dataset][split]
    xs, ys = [], []
    for name, (where, raw) in zip(names, _read_members(os.fspath(path), names, dataset)):
        data, labels = _read_batch(where, raw, dataset, _IMAGES_PER_FILE[dataset][name])
        xs.append(data)
        ys.append(labels)
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    y = np.concatenate(ys)
    if n is not None and n < len(y):
        if subset == "paper":
            idx = np.random.RandomState(seed).choice(len(y), n, replace=False)
        else:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].numpy()
        x, y = x[idx], y[idx]
    return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y)


# Fixed split of sklearn's 1797 digits: 1497 train / 300 test, permutation seed 0.
DIGITS_SPLIT = {"n_test": 300, "seed": 0}


def load_digits(split: str = "test", n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 handwritten digits on a fixed seeded split (ships with sklearn).

    Pixel values 0..16 are divided by 16.  n: a seeded random subset of that size (None: the
    whole split, in its order); more than the split holds is an error.

    Returns:
        x: float32 (N, 1, 8, 8) in [0, 1] (N = n, or 300 for "test", 1497 for "train",
            1797 for "all");  y: int64 (N,).
    """
    from sklearn.datasets import load_digits as _sk_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT["seed"]))
        idx = perm[:DIGITS_SPLIT["n_test"]] if split == "test" else perm[DIGITS_SPLIT["n_test"]:]
        x, y = x[idx], y[idx]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(y):
            raise ValueError(f"n_images: the digits {split} split has {len(y)} images, got {n!r}")
        if n < len(y):
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
            x, y = x[idx], y[idx]
    return x, y
