"""Atomic writes: the one helper every file and folder csplade writes goes through.

A file is written into a temporary file in the destination's own directory, flushed and fsync'ed, and
only then ``os.replace``d over the final name; a folder is built beside its target and renamed into
place. A crash therefore leaves the old file (or folder) or the new one, never half of one; a stray
``.<name>.*.tmp`` file or ``.<name>-*`` folder is the only possible debris.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on a clean exit fsync it and move it over `path`.

    `mode` is "wb" (binary) or "w" (UTF-8 text). On an exception the temporary file is removed and
    `path` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> None:
    """Write `data` as indented JSON to `path` atomically (``json.dumps`` keyword arguments pass on)."""
    dumps_kwargs.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(data, **dumps_kwargs) + "\n")


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on a clean exit it becomes `path`.

    An existing `path` is replaced (``replace=True``) by renaming it aside first, so there is no moment
    without a complete folder under that name; with ``replace=False`` an existing `path` is an error.
    On an exception the temporary folder is removed and `path` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder_files(source: Path, target: Path) -> list[str]:
    """Move the files of `source` into `target`, after removing `target`'s own top-level files.

    Sub-folders of `target` (checkpoints, runs) stay. Returns the names of the files removed. Used when
    a model is saved into the folder that also holds its training checkpoints: a stale file of an
    earlier save (an ``adapter_config.json`` beside a merged model) must not survive.
    """
    target.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in target.iterdir() if p.is_file() or p.is_symlink())
    for name in stale:
        (target / name).unlink()
    for item in source.iterdir():
        os.replace(item, target / item.name)
    return stale
