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
