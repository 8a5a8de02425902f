"""A cache of decoded, resized uint8 images: one ``.npy`` file (memory-mapped) per image list and size.

PNG decoding and resizing dominate the cost of a chest X-ray epoch on CPUs. Decoding once and reading
the memory-mapped array afterwards lets every epoch, round and run reuse the work. The file name is a
hash of the size and every source file's path, byte size and modification time, so a changed list,
size or file gets a new cache, never a stale one.
"""

from __future__ import annotations

import hashlib
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np

from fedxr.data.atomic import sweep_stale_temporaries, temporary_name
from fedxr.errors import DataError
from fedxr.imaging import read_gray, resize_square


def cache_key(paths: Sequence[str | Path], size: int) -> str:
    """SHA-256 over the size and each file's path, byte size and mtime."""
    h = hashlib.sha256(f"fedxr-cache-v1|{size}|".encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise DataError(f"{p}: image listed in the manifest is not on disk; re-run `fedxr data split`") from None
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_path(paths: Sequence[str | Path], size: int, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"images_{size}px_{len(paths)}_{cache_key(paths, size)}.npy"


#: An image whose shorter side is below size / MAX_UPSCALE is refused: enlarged that much it holds no detail
#: the model could learn from, and a thumbnail in a folder of films is more often a mistake than a choice.
MAX_UPSCALE = 2


def _decode(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    try:
        gray = read_gray(path)
    except DataError:
        raise
    except Exception as exc:  # a corrupt file: name it, whatever the decoder raised
        raise DataError(f"{path}: cannot read this image ({type(exc).__name__}: {exc}); replace it, or remove its row "
                        "from the label file") from None
    h, w = gray.shape
    if min(h, w) * MAX_UPSCALE < size:
        raise DataError(f"{path}: image is {w} x {h} px, too small for data.image_size {size} (it would be enlarged "
                        f"more than {MAX_UPSCALE}x); use a smaller data.image_size or the full-size image")
    return resize_square(gray, size)


def build_cache(
    paths: Sequence[str | Path], size: int, cache_dir: str | Path, workers: int | None = None,
    progress: bool = True, desc: str = "caching images",
) -> np.ndarray:
    """Return an (N, size, size) uint8 read-only memmap of the images, building it once if needed."""
    target = cache_path(paths, size, cache_dir)
    if target.is_file():
        return np.load(target, mmap_mode="r")
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(target)  # a killed build's partial file is as large as the cache
    tmp = target.with_name(f"{temporary_name(target)}0")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
    workers = max(1, min(workers or os.cpu_count() or 1, 8))
    jobs = [(str(p), size) for p in paths]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"{desc} ({size}px)", unit="img", disable=not progress, leave=False)
    try:
        if workers == 1 or len(jobs) < 64:
            for i, job in enumerate(jobs):
                out[i] = _decode(job)
                bar.update()
        else:
            with get_context("fork").Pool(workers) as pool:
                for i, arr in enumerate(pool.imap(_decode, jobs, chunksize=16)):
                    out[i] = arr
                    bar.update()
        out.flush()
        del out
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return np.load(target, mmap_mode="r")
