"""The evaluation's files: one JSON record per finished task, read back safely, signed, and one run per folder.

An evaluation writes every finished (task, batch) as its own record under OUT/batches/RUN/ (RUN: a hash of the
settings), so an interrupted run resumes.  What can go wrong with files on disk, and what this module does:

- **Bad records.**  A record is read only if it is a regular file (not a link to /dev/zero or a FIFO) of at most
  `max_bytes` (checked before reading; the caller bounds it by what the record can hold) and JSON nested at most
  MAX_DEPTH deep (checked on the bytes before parsing: a 200k-deep array would otherwise exhaust the parser's
  recursion).  Every field the evaluation reads is then checked by the caller.  A record that fails is reported by
  path, renamed *.unreadable (never deleted: it may be evidence) and recomputed.
- **Edited records.**  Each record carries an HMAC-SHA256 of its content under a random key created with the run
  (RUN/key), so a record changed by hand, or copied from another run, is detected, set aside and recomputed.  This
  guards against accidental edits, stray copies and a careless or naive forger; it does not stop someone who can
  read the key (it sits beside the records, readable by whoever can write them) and re-signs an edited record.  For
  that, keep results on storage others cannot write.
- **Two runs on one folder.**  `RunLock` holds an OS file lock (fcntl.flock) on OUT/.lock for the whole run, so a
  second run on the same --out is refused with the holder's PID instead of deleting its temporary files or
  overwriting its results; the kernel releases the lock when a run dies, even by SIGKILL.
- **Interrupted writes.**  Records and outputs are written atomically (a temporary file, fsync, rename); the
  temporary files a killed run left are removed by the next run, which holds the lock, so none belongs to a live run.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys

from ._files import atomic_write_text

MAX_DEPTH = 8  # records nest 4 deep (object > candidates > runs > images); this leaves room and bounds the parser
LOCK_NAME = ".lock"
KEY_NAME = "key"
_TMP = re.compile(r"\.tmp\d+$")  # what _files.atomic_write leaves behind when killed mid-write


class RecordError(ValueError):
    """A record that cannot be used: the message says why (without the record's content)."""


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays/objects more than `limit` deep (brackets inside strings do not count)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def read_json_bounded(path: str, max_bytes: int, max_depth: int = MAX_DEPTH):
    """The JSON value in the regular file `path`, refusing (RecordError) a non-regular file (a symlink, /dev/zero, a
    FIFO), more than `max_bytes` bytes, invalid UTF-8 or JSON, and nesting deeper than `max_depth`.  Never reads more
    than max_bytes + 1 bytes.  OSError (e.g. the file vanished) passes through."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RecordError("it is a symbolic link, not a record file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RecordError("it is not a regular file")
        if info.st_size > max_bytes:
            raise RecordError(f"it has {info.st_size:,} bytes, more than a record can hold ({max_bytes:,})")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise RecordError(f"it has more than {max_bytes:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if json_depth_exceeds(text, max_depth):
        raise RecordError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RecordError(f"not valid JSON ({str(e)[:120]})") from None


def set_aside(path: str) -> str:
    """Rename a bad file out of the way (never delete it: it may be evidence) and return the new name."""
    aside, n = f"{path}.unreadable", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.unreadable{n}"
    os.replace(path, aside)
    return aside


def remove_leftover_tmp(out_dir: str, outputs=()) -> list:
    """Delete the temporary files of interrupted atomic writes: under out_dir/batches, and of `outputs` (file names in
    out_dir).  Call it only while holding the run lock: then no live run owns them."""
    removed = []
    for dirpath, _, names in os.walk(os.path.join(out_dir, "batches")):
        removed += [os.path.join(dirpath, n) for n in names if _TMP.search(n)]
    if os.path.isdir(out_dir):
        removed += [os.path.join(out_dir, n) for n in os.listdir(out_dir) if _TMP.search(n) and _TMP.sub("", n) in outputs]
    for path in removed:
        os.remove(path)
    return removed


class RunLock:
    """An exclusive OS lock on `out_dir` for one run (a context manager).  A second run is refused with a ValueError
    naming the holder's PID; the kernel drops the lock when the holding process ends, however it ends."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self._fd = out_dir, os.path.join(out_dir, LOCK_NAME), None

    def __enter__(self):
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"out {self.out_dir!r}: another run is using this folder (PID {holder}, lock file "
                                 f"{self.path}); wait for it to finish, or give this run its own --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (removing it would race a new run)
            self._fd = None
        return False


class RecordStore:
    """Records of one run under `root` (OUT/batches/RUN), each signed with the run's key (module docstring).

    `read(path, check)` returns the record at path, or None when there is none or it is bad (then it is reported
    and set aside); check(record) raises ValueError for a record whose content disagrees with what the caller
    expects.  `write(path, record)` signs and writes atomically.  The run's key is created by whichever rank comes
    first (O_EXCL: one key) and read by the others; repair=True (one rank: the one that prepares the run) replaces
    a damaged key."""

    MAC = "mac"

    def __init__(self, root: str, repair: bool = True):
        self.root = root
        self._key = self._load_key(os.path.join(root, KEY_NAME), repair)

    @staticmethod
    def _load_key(key_path: str, repair: bool) -> bytes:
        for attempt in range(2):
            os.makedirs(os.path.dirname(key_path), exist_ok=True)
            try:  # written to a temporary name and linked into place: a reader never sees half a key
                tmp = f"{key_path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(secrets.token_hex(32))
                os.link(tmp, key_path)
            except FileExistsError:
                pass
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            try:
                with open(key_path) as f:
                    key = f.read(129).strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{key_path}: cannot read the run's record key ({e})") from None
            if re.fullmatch(r"[0-9a-f]{64}", key):
                return bytes.fromhex(key)
            if not repair or attempt:
                raise ValueError(f"{key_path}: not a record key; rerun so that the first rank recreates it")
            # a damaged key makes every record unverifiable: set it aside and make a new one (records get recomputed)
            print(f"{key_path}: damaged record key, moved to {set_aside(key_path)}; this run's records will be "
                  "recomputed", file=sys.stderr)
        raise AssertionError("unreachable")

    def _mac(self, record: dict) -> str:
        body = json.dumps({k: v for k, v in record.items() if k != self.MAC}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def read(self, path: str, check, max_bytes: int):
        if not os.path.lexists(path):
            return None
        try:
            record = read_json_bounded(path, max_bytes)
            if not isinstance(record, dict):
                raise RecordError(f"not a JSON object but a {type(record).__name__}")
            mac = record.get(self.MAC)
            if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(record)):
                raise RecordError("its signature does not match its content (edited, or written by another run)")
            check(record)
            return record
        except (OSError, ValueError, TypeError) as e:  # RecordError is a ValueError
            aside = set_aside(path)
            print(f"{path}: unreadable or inconsistent result record ({e}); moved to {aside}, recomputing it",
                  file=sys.stderr)
            return None

    def write(self, path: str, record: dict) -> dict:
        record = {**record, self.MAC: self._mac(record)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(record))
        return record
