"""Writing result and checkpoint files so that a killed run never leaves a half-written one."""
from __future__ import annotations

import os


def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name beside `path`, flush it to disk, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def load_weights_file(path):
    """torch.load(path, weights_only=True), with a file that pickles more than tensors refused by a
    ValueError (torch's own message suggests weights_only=False, i.e. running the file's code)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True) (the file pickles more than "
            "tensors). If you trust it, re-save just its state dict, e.g. as .safetensors. "
            f"Original error: {str(e).splitlines()[0]}") from e
