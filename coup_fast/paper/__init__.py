"""Reproductions of the paper's analyses (arXiv 2408.05900, Sec. 4.3, 5.3, 5.4).

- :mod:`.toy`: the 2-Gaussian label-flip study (Sec. 5.3.2, Fig. 3b) and a numerical check
  of Proposition 2 (Eq. 8).
- :mod:`.trajectory`: classifier confidence along the purification path (Sec. 5.3.1, Fig. 2a).
- :mod:`.sweep`: clean and robust accuracy against t* and lam (Sec. 5.4, Fig. 4).
- :mod:`.cli`: ``coup-fast paper {toy,trajectory,sweep}``.

Every analysis runs through the engine's own solver (`coup_fast.solver.solve` / `purify`).
Each one checks that its output directory is writable before it computes anything, and the
toy study and the sweep keep each finished cell on disk (:class:`CellStore`), so an interrupted
run resumes where it stopped when the same command is run again.
"""

import csv
import hashlib
import json
import math
import os
import sys

import torch

from .._files import atomic_write, atomic_write_text
from ..records import RecordError, read_json_bounded, set_aside

CELLS_DIR = "cells"  # under the output directory: one JSON file per finished cell of a toy study or sweep
CELL_MAX_BYTES = 1 << 20  # a cell is a few dozen numbers: a file larger than this is not one
CELL_MAX_KEYS = 256


def check_out_dir(out_dir, files=(), arg: str = "out_dir") -> str:
    """Create `out_dir` and prove that it takes files (a probe written and removed) before any compute.

    files: the names the study will write there; one that exists and is not a regular file is
    refused too.  arg names the argument in the errors (the CLI passes '--out').  Returns out_dir.
    Raises ValueError: out_dir is not a path, cannot be created (a regular file, a path under
    one), is not writable, or a probe file cannot be written in it.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"{arg}: expected a directory path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{arg} {out_dir!r}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # FileExistsError (a regular file), NotADirectoryError (a path under one), EACCES, EROFS
        raise ValueError(f"{arg} {out_dir!r}: cannot create the output directory ({e.strerror or e})") from None
    # os.access tells an unprivileged user early; root passes it, so the probe is the real test
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {out_dir!r}: the output directory is not writable")
    probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{arg} {out_dir!r}: cannot write a file in the output directory ({e.strerror or e})") from None
    for name in files:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ValueError(f"{arg} {out_dir!r}: {name} exists there and is not a regular file")
    return out_dir


def fingerprint(*objects) -> str:
    """sha256 over the tensors of `objects` (modules: their state dicts; tensors: themselves).

    It keys resumable cells to the networks and data they were computed on, so a retrained
    model under the same path does not reuse old cells.  Other objects count by type name only.
    """
    h = hashlib.sha256()
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.state_dict().items())
        elif isinstance(obj, torch.Tensor):
            tensors = [("", obj)]
        else:
            h.update(f"object:{type(obj).__module__}.{type(obj).__qualname__};".encode())
            continue
        h.update(f"{type(obj).__qualname__}:{len(tensors)};".encode())
        for name, t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CellStore:
    """The finished cells of one long study, one small JSON file each, so that a rerun resumes.

    key: everything that changes a cell's numbers (the study's settings, a `fingerprint` of its
    networks and data); its sha256 names the files and is checked inside each one, so a study
    under another key never reuses them.  A cell's value is a flat object of named numbers (finite, or null),
    the only thing the studies store.  A file that is not a regular file, too large or deep to be a cell,
    unreadable, foreign, or whose value is not such an object is reported, set aside (renamed *.unreadable, never
    deleted) and its cell recomputed (coup_fast.records reads it boundedly).  `clear()` removes this key's
    cells once the study's outputs are written.  directory=None: a store that keeps nothing.
    """

    def __init__(self, directory: str | None, key: dict):
        self.directory = directory
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()
        self.written = []

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{self.key[:16]}-{name}.json")

    def get(self, name: str):
        """The value stored for cell `name` under this key, or None."""
        if self.directory is None or not os.path.lexists(self._path(name)):
            return None
        path = self._path(name)
        try:
            record = read_json_bounded(path, CELL_MAX_BYTES, max_depth=3)
            if not isinstance(record, dict) or record.get("key") != self.key or record.get("name") != name:
                raise RecordError("it belongs to another study")
            check_cell_value(record.get("value"))
            self.written.append(path)
            return record["value"]
        except (OSError, ValueError) as e:  # RecordError is a ValueError
            aside = set_aside(path)
            print(f"{path}: unreadable cell ({e}); moved to {aside}, recomputing it", file=sys.stderr)
            return None

    def put(self, name: str, value) -> None:
        check_cell_value(value)
        """Store cell `name` atomically (a killed run never leaves half a file)."""
        if self.directory is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        atomic_write_text(self._path(name), json.dumps({"key": self.key, "name": name, "value": value}))
        self.written.append(self._path(name))

    def clear(self) -> None:
        """Remove this study's cells (after its outputs are written: they hold nothing more)."""
        for path in self.written:
            if os.path.exists(path):
                os.remove(path)
        self.written = []
        if self.directory is not None and os.path.isdir(self.directory) and not os.listdir(self.directory):
            os.rmdir(self.directory)


def check_cell_value(value) -> None:
    """A cell's value: an object of at most CELL_MAX_KEYS named numbers (finite) or nulls; RecordError otherwise."""
    if not isinstance(value, dict) or not 0 < len(value) <= CELL_MAX_KEYS:
        raise RecordError(f"its value is a {type(value).__name__}, not an object of named numbers")
    for key, v in value.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not isinstance(key, str) or len(key) > 100 or not (number or v is None):
            raise RecordError(f"its value's entry {str(key)[:40]!r} is {str(v)[:40]!r}, not a finite number")


def write_outputs(result: dict, out_dir: str, name: str, plot) -> dict:
    """NAME.csv (result['rows']), NAME.json (everything), NAME.png (plot(result, path)) under out_dir,
    each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("csv", "json", "png")}

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
            writer.writeheader()
            writer.writerows(result["rows"])

    atomic_write(paths["csv"], write_csv)
    atomic_write_text(paths["json"], json.dumps(result, indent=2))
    atomic_write(paths["png"], lambda tmp: plot(result, tmp))
    return paths
