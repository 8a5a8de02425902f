"""`model.precision: auto`: bf16 autocast where the hardware does bf16 natively, FP32 elsewhere.

On a CPU with AMX or AVX512-BF16, oneDNN runs bf16 convolutions natively: ResNet-18 at 96 px, batch 32, two
threads trains 1.6-1.8x faster under bf16 autocast than in FP32 on a 2-core AMD EPYC with AVX512-BF16
(`benchmarks/cpu_precision.py`). A CPU
without them would emulate bf16 and run slower, so there it stays FP32. On a GPU that supports bf16, bf16-mixed.
Differential privacy keeps FP32: Opacus clips per-image gradients, and the privacy figures were measured so.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

#: The Lightning precisions a recipe can train in (``model.precision`` but ``auto``, which resolves to one of them).
Precision = Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"]

#: CPU flags (Linux /proc/cpuinfo names) under which bf16 autocast is native and fast.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=4)
def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The flags of :data:`BF16_CPU_FLAGS` this CPU has (empty when none, or where ``cpuinfo`` is absent).
    ``FEDXR_CPU_BF16=0`` hides them (force FP32 on such a CPU), ``=1`` claims them (a CPU this check misses).
    Read from the kernel's CPU flags rather than torch's oneDNN check, which also says yes where bf16 is only
    emulated (AVX-512 without its bf16 instructions) and slower than FP32."""
    forced = os.environ.get("FEDXR_CPU_BF16")
    if forced in ("0", "1"):
        return ("FEDXR_CPU_BF16=1",) if forced == "1" else ()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def _uses_cuda(accelerator: str) -> bool:
    if accelerator == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def recipe_precision(recipe) -> tuple[Precision, str]:
    """The precision a recipe trains in on this machine, and why: what every trainer uses, what the round records
    and the stage fingerprints hold."""
    return resolve_precision(recipe.model.precision, recipe.model.accelerator, dp=bool(recipe.privacy.dp))


def resolve_precision(requested: Precision | Literal["auto"], accelerator: str = "auto",
                      dp: bool = False) -> tuple[Precision, str]:
    """The Lightning precision a recipe's ``model.precision`` means on this machine, and why (for the records).
    Anything but ``auto`` is taken as written."""
    if requested != "auto":
        return requested, "as the recipe says"
    if dp:
        return "32-true", "privacy.dp: per-image clipping in FP32"
    if _uses_cuda(accelerator):
        import torch

        # Native bf16 only (Ampere and later: compute capability 8): is_bf16_supported() also says yes where it is
        # emulated, and slow. The properties query opens no context on the device (every DDP rank asks this).
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)))
        if props.major >= 8:
            return "bf16-mixed", f"GPU {props.name} has native bf16"
        return "32-true", f"GPU {props.name} has no native bf16 (compute capability {props.major}.{props.minor})"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16-mixed", f"CPU has {', '.join(flags)}"
    return "32-true", "CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than FP32)"
