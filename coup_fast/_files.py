"""Files: atomic writes of results, and safe reading of user-supplied checkpoints.

Checkpoints are read without running anything they contain: ``.safetensors`` holds only
tensors, and torch files go through ``torch.load(weights_only=True)``, whose unpickler
builds tensors and plain containers only.  On top of torch's defaults we allow exactly the
numpy scalar and dtype globals, because Score SDE's training loop stores its learning rate
as a ``numpy.float64`` (``lr * np.minimum(step / warmup, 1.0)``) in the optimizer state, so
every genuine ``checkpoint_*.pth`` pickles ``numpy.core.multiarray.scalar`` and
``numpy.dtype``.  Everything else (classes, functions, a ``__reduce__`` payload) is refused
with the refused global named.

Before torch reads a byte of a checkpoint, its declared sizes are checked against the file's
(:func:`check_declared_sizes`): a small file must not make torch allocate gigabytes.  A torch zip
stores its records uncompressed, so a compressed record of a large declared size is a bomb; a
legacy (non-zip) file holds every storage's bytes after its pickle, so storages that declare
more bytes than the file has are forged or truncated.  A safetensors header naming a tensor
twice is refused, as are weights that are not dense real numbers of the model's kind, not
finite, or a BatchNorm's negative running variance (:func:`load_state_dict_strict`).
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import pickletools
import re
import struct
import threading
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file

try:  # the numpy-scalar constructor: numpy 2 names it numpy._core, numpy < 1.26 only numpy.core
    from numpy._core.multiarray import scalar
except ImportError:
    from numpy.core.multiarray import scalar

__all__ = ["atomic_write", "atomic_write_text", "load_weights_file", "numpy_scalar_globals",
           "load_state_dict_strict", "strip_module_prefix", "check_weight", "check_declared_sizes",
           "safetensors_header"]


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


# --------------------------------------------------------------------------- declared sizes
# A torch zip's records are stored, not compressed: a compressed record is someone else's zip.  Real
# weights deflate by well under 2x; a few small records of zeros (a fresh bias) deflate far more,
# hence the slack.  Past these a record is a bomb: 1 MB of DEFLATE inflates to 1 GB.
_MAX_DEFLATE_RATIO = 20
_DEFLATE_SLACK = 1 << 20
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, the legacy format's first pickle


class _Refused(ValueError):
    """A size check's own refusal (anything else raised while reading the sizes means a damaged file)."""


def _clip(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: names from a file go into messages bounded."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _directory_span(f, size: int) -> tuple[int, int, int]:
    """(offset, size, end) of a zip's central directory as its end record states them; end is where
    the end record (the zip64 one if any) starts.  The same search as zipfile's and miniz's: the
    last end-record signature in the file's last 64 KiB."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or tail_len - at < 22:
        raise zipfile.BadZipFile("no end of central directory record")
    cd_size, cd_offset = struct.unpack("<II", tail[at + 12:at + 20])
    end = size - tail_len + at
    if at >= 20 and tail[at - 20:at - 16] == _ZIP64_LOCATOR:
        (record,) = struct.unpack("<Q", tail[at - 12:at - 4])
        f.seek(record)
        z64 = f.read(56)
        if len(z64) < 56 or z64[:4] != _ZIP64_EOCD:
            raise zipfile.BadZipFile("a zip64 locator without its record")
        size64, offset64 = struct.unpack("<QQ", z64[40:56])
        if record + 56 + 20 != end or cd_size not in (size64, 0xFFFFFFFF) or cd_offset not in (offset64, 0xFFFFFFFF):
            raise zipfile.BadZipFile("the zip64 end record disagrees with the end record")
        cd_size, cd_offset, end = size64, offset64, record
    return cd_offset, cd_size, end


def _check_zip_records(path: str, f, size: int) -> None:
    # zipfile reads the directory at (end - its size), miniz (torch) at the offset the record states:
    # they read the same entries only when those agree, as they do in every file torch writes.
    cd_offset, cd_size, end = _directory_span(f, size)
    if cd_offset + cd_size != end:
        raise _Refused(f"{path}: not a readable torch checkpoint: corrupt or truncated (its zip directory "
                      f"is stated at bytes {cd_offset:,}..{cd_offset + cd_size:,} but ends at {end:,})")
    f.seek(0)
    declared = 0
    for record in zipfile.ZipFile(f).infolist():
        name = _clip(record.filename)
        if record.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(f"{path}: the record {name} is compressed with method {record.compress_type}, "
                          "which torch cannot read (it stores its records uncompressed)")
        if record.header_offset + record.compress_size > size or (
                record.compress_type == zipfile.ZIP_STORED and record.file_size != record.compress_size):
            raise _Refused(f"{path}: not a readable torch checkpoint: corrupt or truncated (the record {name} "
                          f"declares {record.file_size:,} bytes, stored in {record.compress_size:,} at byte "
                          f"{record.header_offset:,} of {size:,})")
        ratio = record.file_size / max(record.compress_size, 1)
        if record.file_size > _MAX_DEFLATE_RATIO * record.compress_size + _DEFLATE_SLACK:
            raise _Refused(f"{path}: the record {name} declares {record.file_size:,} bytes compressed into "
                          f"{record.compress_size:,} (a ratio of {ratio:,.0f}; "
                          f"at most {_MAX_DEFLATE_RATIO} is accepted): refusing to inflate it. torch stores its "
                          "records uncompressed; re-save the weights with torch.save or as .safetensors")
        declared += record.file_size
        if declared > _MAX_DEFLATE_RATIO * size + _DEFLATE_SLACK:
            raise _Refused(f"{path}: its records declare {declared:,} bytes by {name}, more than "
                          f"{_MAX_DEFLATE_RATIO} times the file's {size:,}: refusing to inflate them")


def _scan_pickle(stream, on_persistent_id=None):
    """Walk one pickle on `stream` without building it (:func:`pickletools.genops` runs nothing),
    tracking only the numbers, strings, globals (as ``("global", module, name)``) and tuples on its
    stack; hand each persistent id to `on_persistent_id`.  Returns the pickle's value if it is one
    of those, else a placeholder.  Shared memo entries cost nothing here: nothing is expanded."""
    stack, marks, memo, opaque = [], [], {}, object()
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "STOP":
            return stack[-1]
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
            continue
        before = op.stack_before  # what the opcode consumes, from pickletools' table
        items = []
        if pickletools.markobject in before:
            at = marks.pop()
            items, stack[at:] = stack[at:], []
            before = before[:before.index(pickletools.markobject)]
        popped = [stack.pop() for _ in before][::-1]
        if name == "TUPLE":
            value = tuple(items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            value = tuple(popped)
        elif name == "GLOBAL":
            value = ("global", *arg.split(" ", 1))
        elif name == "STACK_GLOBAL":
            value = ("global", *popped)
        elif name in ("BINPERSID", "PERSID"):
            if on_persistent_id:
                on_persistent_id(popped[0] if name == "BINPERSID" else arg)
            value = opaque
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            value = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name]
        elif arg is not None and not before:  # a number or a string
            value = arg
        else:
            value = opaque
        stack.extend([value] * len(op.stack_after))
    raise ValueError("pickle exhausted before seeing STOP")


# Bytes per element of the storage classes a legacy file names (torch.FloatStorage, ...).
_STORAGE_ELEMENT_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                          "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                          "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QUInt8Storage": 1,
                          "QInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1}


def _element_bytes(storage_type) -> int:
    """Bytes per element of a pickled storage class, ``("global", "torch", "FloatStorage")``; 16, the
    most, for any other (torch's unpickler refuses those before it allocates anything)."""
    if isinstance(storage_type, tuple) and storage_type[:2] == ("global", "torch"):
        return _STORAGE_ELEMENT_BYTES.get(storage_type[2], 16)
    return 16


def _check_legacy_storages(path: str, f, size: int) -> None:
    """torch's legacy reader allocates each storage at the size its persistent id states (numel
    times the element size) before it reads a byte of it; every storage's bytes follow the
    pickle in the file, so together they cannot exceed the file."""
    if _scan_pickle(f) != _LEGACY_MAGIC:
        return  # not torch's legacy format: torch.load refuses it before allocating anything
    _scan_pickle(f)  # the protocol version
    _scan_pickle(f)  # the system information
    storages = {}

    def record(pid):  # ('storage', storage_type, root_key, location, numel, view_metadata)
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and type(pid[4]) is int:
            storages.setdefault(pid[2], (pid[4], _element_bytes(pid[1])))

    _scan_pickle(f, record)
    declared = 0
    for key, (numel, element) in storages.items():
        declared += numel * element
        if declared > size:
            raise _Refused(f"{path}: not a readable torch checkpoint: corrupt or truncated (its storages "
                          f"declare {declared:,} bytes by the storage {_clip(key)} ({numel:,} elements of "
                          f"{element} bytes), more than the file's {size:,}, which holds them all)")


def check_declared_sizes(path) -> None:
    """Check a torch checkpoint's declared sizes against the file before ``torch.load`` allocates
    them: a zip's records (:data:`_MAX_DEFLATE_RATIO`), a legacy file's storages.

    Raises:
        ValueError: naming the file and the record or storage.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            if f.read(4) == _ZIP_MAGIC:
                _check_zip_records(path, f, size)
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:  # reads clamp at the end
                    _check_legacy_storages(path, view, size)
        except _Refused:
            raise
        except Exception as e:  # a damaged directory or pickle: say so, as torch's reader would
            first_line = (str(e).splitlines() or [""])[0]
            raise _Refused(f"{path}: not a readable torch checkpoint: corrupt or truncated "
                          f"({type(e).__name__}: {_clip(first_line, 200)})") from None


# --------------------------------------------------------------------------- safetensors header
# The safetensors library accepts headers up to 100 MB; a real one is about 150 bytes per tensor
# (the largest checkpoints here hold a few thousand tensors).  16 MiB keeps the JSON parse bounded.
_MAX_SAFETENSORS_HEADER = 16 << 20


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def safetensors_header(path) -> dict:
    """A safetensors file's JSON header, read here (the library keeps the last of two equal keys
    silently): the 8-byte little-endian length, bounded, then the JSON, every object's keys unique.

    Raises:
        ValueError: a key named twice (named), a header longer than the file or than
            ``_MAX_SAFETENSORS_HEADER``, or not JSON.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f"{path}: corrupt or truncated safetensors file (a header of {length:,} bytes in a "
                             f"file of {size:,}; at most {_MAX_SAFETENSORS_HEADER:,} are read)")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{path}: the safetensors header names {_clip(e.args[0])} twice: refusing to "
                         "choose one") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise ValueError(f"{path}: corrupt or truncated safetensors file (its header is not JSON: "
                         f"{_clip(str(e), 200)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt or truncated safetensors file (its header is not a JSON object)")
    return header


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
            checkpoint at all / is corrupt or truncated, or it declares sizes it cannot hold
            (:func:`check_declared_sizes`), or a safetensors header names a tensor twice.
    """
    path = os.fspath(path)
    if _sniff(path) == "safetensors":
        safetensors_header(path)  # a key named twice, which the library would take silently
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    check_declared_sizes(path)
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


def _check_keys(state_dict: dict, source) -> None:
    not_strings = [k for k in state_dict if not isinstance(k, str)]
    if not_strings:
        raise ValueError(f"{source}: not a state dict: the key {_clip(not_strings[0])} is a "
                         f"{type(not_strings[0]).__name__}, not a parameter name")


def strip_module_prefix(state_dict: dict, source="the state dict") -> dict:
    """Drop the ``module.`` that ``nn.DataParallel`` / DDP put before every key.

    Raises ValueError naming `source` for a key that is not a string, or when a key is there
    both with and without the prefix (``module.fc.weight`` and ``fc.weight``): which one the
    file means cannot be told.
    """
    _check_keys(state_dict, source)
    prefix, out, origin = "module.", {}, {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in out:
            raise ValueError(f"{source}: both {_clip(origin[name])} and {_clip(key)} name the tensor "
                             f"{_clip(name)} (a DataParallel prefix on one of them): refusing to choose one")
        out[name], origin[name] = value, key
    return out


def check_weight(source, key: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value`, read from `source`, checked and cast to take `like`'s place in a network.

    It must be a dense tensor with data (not sparse, quantized, nested or meta) whose elements
    its storage holds (a stride-0 view can claim any shape), of the same kind of number as
    `like` (real floating point for floating point, integer for integer, bool for bool); after the
    cast to ``like.dtype`` a floating tensor must be finite, and a ``running_var`` non-negative
    (a BatchNorm divides by its square root).  Returns the cast tensor.

    Raises:
        ValueError: naming `source` and `key` and what is wrong.
    """
    where = f"{source}: {key if len(key) <= 120 else key[:120] + '...'}"
    if value.layout != torch.strided or value.is_quantized or value.is_nested:
        kind = "quantized" if value.is_quantized else "nested" if value.is_nested else str(value.layout)
        raise ValueError(f"{where} is a {kind} tensor; a weight must be a dense one (re-save it with .to_dense())")
    if value.is_meta:
        raise ValueError(f"{where} is a meta tensor: it has a shape but no values")
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise ValueError(f"{where}: {value.numel():,} elements over {value.untyped_storage().nbytes():,} bytes "
                         "of storage (overlapping strides); save it contiguous")
    if like.is_floating_point():
        fits, kind = value.is_floating_point(), "real floating-point"
    elif like.dtype == torch.bool:
        fits, kind = value.dtype == torch.bool, "bool"
    else:
        fits, kind = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool), "integer"
    if not fits:
        raise ValueError(f"{where} holds {value.dtype} values; the network expects {kind} ({like.dtype})")
    value = value.to(like.dtype)
    if value.is_floating_point():
        finite = torch.isfinite(value)
        if not finite.all():
            raise ValueError(f"{where} holds {int((~finite).sum()):,} NaN or infinite values (as {like.dtype}): "
                             "a network with them gives NaN logits")
        if key.endswith("running_var") and (value < 0).any():
            raise ValueError(f"{where} holds {int((value < 0).sum()):,} negative variances (min "
                             f"{value.min().item():.3g}): BatchNorm divides by their square root")
    return value


def load_state_dict_strict(model, state_dict: dict, source, arch: str):
    """Assign `state_dict` to `model` (typically built on the meta device) after checking that
    the keys match exactly and every shape agrees; every tensor goes through :func:`check_weight`
    (dense, the model's kind of number, finite) and takes the model's dtype.

    Raises ValueError naming `source` and `arch`, the first missing / unexpected keys, the
    first tensor whose shape differs, or the first tensor :func:`check_weight` refuses.
    """
    _check_keys(state_dict, source)
    not_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise ValueError(f"{source}: not a {arch} state dict: {_clip(not_tensors[0])} holds a "
                         f"{type(state_dict[not_tensors[0]]).__name__}, not a tensor")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k if len(k) <= 80 else f"{k[:80]}..." for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{source}: not a {arch} state dict: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
    bad = [k for k in expected if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {arch}: {bad[0]} is "
                         f"{tuple(state_dict[bad[0]].shape)} in the file, "
                         f"{tuple(expected[bad[0]].shape)} in the model ({len(bad)} mismatched tensors)")
    cast = {k: check_weight(source, k, v, expected[k]) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model
