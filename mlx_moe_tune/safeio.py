"""Files that survive crashes and concurrent writers: atomic replaces, locked appends, torn tails.

- Whole files (tables, JSON sidecars, tune.csv, reports) are written to a temp file in the same
  directory and moved over the target with `os.replace`, so a reader or a crash sees the old
  file or the new one, never half of one.
- Append-only logs (the sweep CSV, the tuner's JSONL cache) get one complete line per write,
  flushed, under an exclusive `fcntl.flock`, so two processes appending to the same file cannot
  interleave inside a line. A process killed mid-write can still leave a torn last line (no
  trailing newline): `drop_torn_tail` cuts it off before anything is appended after it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not on Linux or macOS: no locking (atomic replaces still hold)
    fcntl = None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to fill a temp file beside `path`, fsync it, then os.replace it
    over `path`. The temp file is removed if `write` raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


@contextlib.contextmanager
def locked(f, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on open file `f` (BlockingIOError when not `blocking` and taken)."""
    if fcntl is None:
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ends_with_newline(f) -> bool:
    """`f` open in binary mode with read access: is it empty or does it end with b"\\n"?"""
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
        return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (newline added) under an exclusive lock. A torn last line left by a
    killed writer is ended first, so it stays one bad line instead of swallowing this one."""
    data = (line.rstrip("\n") + "\n").encode()
    with open(path, "ab+") as f, locked(f):
        if not _ends_with_newline(f):
            data = b"\n" + data
        f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()


def drop_torn_tail(path: str | os.PathLike, *, lock: bool = True) -> int:
    """Cut a last line without its newline (a writer killed mid-line) off `path`; returns the
    bytes dropped (0 when the file ends cleanly or does not exist). `lock=False`: the caller
    already holds the file's lock (flock is per open file: taking it again would wait forever)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f, (locked(f) if lock else contextlib.nullcontext()):
        if _ends_with_newline(f):
            return 0
        size = f.seek(0, os.SEEK_END)
        # find the last newline, reading backwards in blocks
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)
        return size - keep


def warn(msg: str) -> None:
    print(f"mlx-moe-tune: warning: {msg}", file=sys.stderr, flush=True)
