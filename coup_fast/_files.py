"""Files: atomic writes of results, and safe reading of user-supplied checkpoints.

Checkpoints are read without running anything they contain: ``.safetensors`` holds only
tensors, and torch files go through ``torch.load(weights_only=True)``, whose unpickler
builds tensors and plain containers only.  On top of torch's defaults we allow exactly the
numpy scalar and dtype globals, because Score SDE's training loop stores its learning rate
as a ``numpy.float64`` (``lr * np.minimum(step / warmup, 1.0)``) in the optimizer state, so
every genuine ``checkpoint_*.pth`` pickles ``numpy.core.multiarray.scalar`` and
``numpy.dtype``.  Everything else (classes, functions, a ``__reduce__`` payload) is refused
with the refused global named.
"""
from __future__ import annotations

import os
import pickle
import re
import threading

import numpy as np
import torch
from safetensors.torch import load_file

try:  # the numpy-scalar constructor: numpy 2 names it numpy._core, numpy < 1.26 only numpy.core
    from numpy._core.multiarray import scalar
except ImportError:
    from numpy.core.multiarray import scalar

__all__ = ["atomic_write", "atomic_write_text", "load_weights_file", "numpy_scalar_globals",
           "load_state_dict_strict", "strip_module_prefix"]


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


# --------------------------------------------------------------------------- safe loading
def numpy_scalar_globals() -> list:
    """The globals a pickled numpy scalar needs, under the numpy-1 and numpy-2 names.

    ``pickle.dumps(np.float64(0.1))`` is ``scalar(dtype('f8', False, True), raw_bytes)``:
    GLOBAL ``numpy.core.multiarray.scalar`` (numpy 1) or ``numpy._core.multiarray.scalar``
    (numpy 2), GLOBAL ``numpy.dtype``, then a BUILD of the dtype's state, which torch's
    unpickler permits only for allow-listed types, hence the concrete dtype classes
    (``numpy.dtypes.Float64DType`` ...; numpy 2 also pickles a dtype *class* under that name).
    Only boolean and numeric dtypes: an object or structured dtype could smuggle objects in.
    numpy 2 keeps ``numpy.core.multiarray.scalar`` importable, as the same function, precisely
    so that old pickles load; the unpickler here never imports it, it maps the name.
    """
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128)
    dtype_classes = [type(np.dtype(t)) for t in numeric]
    return ([(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
             (np.dtype, "numpy.dtype")]
            + [(cls, f"numpy.dtypes.{cls.__name__}") for cls in dtype_classes])


_SAFE_GLOBALS_LOCK = threading.Lock()
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80        # first byte of a protocol-2+ pickle: torch's legacy format


def _sniff(path: str) -> str:
    """'torch', 'safetensors' or a ValueError saying what the file is not."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    # safetensors: an 8-byte little-endian header length, then the JSON header.  Tested first:
    # a header length such as 640 starts with the bytes of a pickle's protocol opcode.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head.startswith(_ZIP_MAGIC) or (head[0] == _PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5):
        return "torch"
    raise ValueError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle) and "
                     "not a safetensors file")


# What torch's weights_only unpickler says when it meets something other than weights
# (a global, a call, an object to build); anything else it says means a damaged stream.
_REFUSALS = ("GLOBAL", "Can only", "reduce for unrecognized function", "persistent_load")
# The general advice torch wraps around the unpickler's own line.
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights_only error that says what stopped the unpickler."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in message.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if any(marker in line for marker in _REFUSALS):
            return line
    detail = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return detail[0] if detail else (lines[0] if lines else "")


def load_weights_file(path):
    """Read a checkpoint without executing anything in it.

    ``.safetensors`` content gives a dict of tensors.  torch files (zip or legacy) go through
    ``torch.load(weights_only=True, map_location='cpu')`` with :func:`numpy_scalar_globals`
    allowed for the duration of the call.  The format is sniffed from the bytes, not the name.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file pickles something else (the refused global is named; torch's
            own advice, weights_only=False, would run the file's code), or it is not a
            checkpoint at all / is corrupt or truncated.
    """
    path = os.fspath(path)
    if _sniff(path) == "safetensors":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    try:
        # torch's allow-list is process-wide: add only what the caller has not allowed already
        # (leaving the context removes it again), one load at a time.
        with _SAFE_GLOBALS_LOCK:
            already = set(torch.serialization.get_safe_globals())
            extra = [g for g in numpy_scalar_globals() if g not in already]
            with torch.serialization.safe_globals(extra):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if not any(marker in reason for marker in _REFUSALS):
            raise ValueError(f"{path}: not a readable torch checkpoint: corrupt or truncated "
                             f"(the unpickler stopped at: {reason})") from e
        refused = re.search(r"GLOBAL (\S+)", reason)
        what = f"the global {refused.group(1)}" if refused else "an object that is not a tensor"
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True): the file pickles {what}, which is "
            "neither a tensor, a plain container nor a numpy scalar, and loading it could run "
            "code. If you trust the file, re-save just its weights, e.g. as .safetensors. "
            f"Unpickler: {reason}") from e
    except Exception as e:  # the zip reader and the legacy reader fail in many ways on bad bytes
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable torch checkpoint: corrupt or truncated "
                         f"({type(e).__name__}: {first_line})") from e


def strip_module_prefix(state_dict: dict) -> dict:
    """Drop the ``module.`` that ``nn.DataParallel`` / DDP put before every key."""
    prefix = "module."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_state_dict_strict(model, state_dict: dict, source, arch: str):
    """Assign `state_dict` to `model` (typically built on the meta device) after checking that
    the keys match exactly and every shape agrees; floating tensors take the model's dtype.

    Raises ValueError naming `source` and `arch`, the first missing / unexpected keys, or the
    first tensor whose shape differs.
    """
    not_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise ValueError(f"{source}: not a {arch} state dict: {not_tensors[0]!r} holds a "
                         f"{type(state_dict[not_tensors[0]]).__name__}, not a tensor")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{source}: not a {arch} state dict: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
    bad = [k for k in expected if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {arch}: {bad[0]} is "
                         f"{tuple(state_dict[bad[0]].shape)} in the file, "
                         f"{tuple(expected[bad[0]].shape)} in the model ({len(bad)} mismatched tensors)")
    cast = {k: (v.to(expected[k].dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model
