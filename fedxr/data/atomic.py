"""Write a folder atomically: build it under a temporary name, then rename it into place."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fedxr.errors import FedxrError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _host() -> str:
    """This machine's name as it may appear in a file name: a PID says nothing about another machine's processes
    (a shared NFS folder, a volume two containers mount)."""
    import socket

    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def temporary_name(path: Path, kind: str = "tmp") -> str:
    """The prefix of a temporary beside ``path`` (``.NAME.tmp-PID@HOST-``): whether its writer still runs can be
    told (on this machine) from its name."""
    return f".{path.name}.{kind}-{os.getpid()}@{_host()}-"


def sweep_stale_temporaries(path: str | Path) -> list[Path]:
    """Clear up after interrupted writes of ``path``: ``.NAME.tmp-PID@HOST…`` (and ``.NAME.old-PID@HOST…``) of this
    machine whose process is gone — a SIGKILL or a power cut gives a writer no chance to clean up, and a killed
    cache build leaves a file as large as the cache. A temporary of a live process (this one included) or of another
    machine is left alone. A folder swap killed between its two renames (:func:`atomic_dir`) left ``path`` missing
    and the previous folder as ``.old``: that is put back, not removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)@([A-Za-z0-9]+)-.*")
    removed = []
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        match = pattern.fullmatch(leftover.name)
        if not match or match.group(3) != _host():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or (pid < 2**31 and _alive(pid)):
            continue
        with contextlib.suppress(OSError):
            if match.group(1) == "old" and not path.exists():
                os.replace(leftover, path)  # the previous version, whole: the swap that replaced it never finished
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | Path, replace: bool = False, replace_if: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, on error it is removed.

    An existing non-empty ``out`` is replaced only when ``replace`` is true or it contains the marker
    file ``replace_if`` (a folder this same command wrote before); otherwise a FedxrError is raised
    before anything is written, so nothing of the user's is lost.
    """
    out = Path(out)
    sweep_stale_temporaries(out)  # first: a swap killed half-way put back before ``out`` is looked at
    if out.exists() and not out.is_dir():
        raise FedxrError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        ours = replace_if is not None and (out / replace_if).exists()
        if not (replace or ours):
            raise FedxrError(f"{out}: folder exists and is not empty; pass --force to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_name(out), dir=out.parent))
    # mkdtemp makes an owner-only folder; give it the old folder's mode, else a plain mkdir's (an export copied to a
    # board must stay readable by its runtime user).
    os.chmod(tmp, out.stat().st_mode & 0o777 if out.is_dir() else 0o777 & ~_umask())
    try:
        yield tmp
        if out.exists():
            old = out.parent / f"{temporary_name(out, 'old')}0"
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
    return write_bytes_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_bytes_atomic(path: str | Path, write) -> Path:
    """``write(binary file)`` into a temporary beside ``path``, on disk before the rename: a kill, a full disk or a
    power cut leaves the previous file whole (a SIGKILL leaves the hidden ``.NAME.tmp-PID@HOST-…`` file, which no
    reader trusts and the next write of ``path`` sweeps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_name(path), dir=path.parent)
    try:
        # mkstemp makes an owner-only file; give it the mode a plain write would (the old file's, else 0666 less
        # the umask), or an export folder copied to a board would hold files its runtime user cannot read.
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def copy_file_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` with :func:`write_bytes_atomic`."""
    def copy(fh) -> None:
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, fh, 1 << 20)

    return write_bytes_atomic(dst, copy)


def save_torch_atomic(path: str | Path, obj) -> Path:
    """``torch.save(obj)`` to ``path`` with :func:`write_bytes_atomic`."""
    import torch

    return write_bytes_atomic(path, lambda fh: torch.save(obj, fh))


def write_json_atomic(path: str | Path, obj, **dumps_args) -> Path:
    """``json.dumps(obj, indent=2, **dumps_args)`` written with :func:`write_text_atomic`."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps_args))
