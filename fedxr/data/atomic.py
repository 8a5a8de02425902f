"""Write a folder atomically: build it under a temporary name, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fedxr.errors import FedxrError


@contextlib.contextmanager
def atomic_dir(out: str | Path, replace: bool = False, replace_if: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on error it is removed.

    An existing non-empty ``out`` is replaced only when ``replace`` is true or it contains the marker
    file ``replace_if`` (a folder this same command wrote before); otherwise a FedxrError is raised
    before anything is written, so nothing of the user's is lost.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedxrError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        ours = replace_if is not None and (out / replace_if).exists()
        if not (replace or ours):
            raise FedxrError(f"{out}: folder exists and is not empty; pass --force to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: a reader (another process, or
    the next run after a crash or a full disk) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        # mkstemp makes an owner-only file; give it the mode a plain write would (the old file's, else 0666 less
        # the umask), or an export folder copied to a board would hold files its runtime user cannot read.
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, obj, **dumps_args) -> Path:
    """``json.dumps(obj, indent=2, **dumps_args)`` written with :func:`write_text_atomic`."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps_args))
