"""`model.precision: auto`: bf16 autocast where the hardware does bf16 natively, FP32 elsewhere.

On a CPU with AMX or AVX512-BF16, oneDNN runs bf16 convolutions natively: ResNet-18 at 96 px, batch 32, two
threads trains ~1.7x faster under bf16 autocast than in FP32 (`benchmarks/train_throughput.py`). A CPU
without them would emulate bf16 and run slower, so there it stays FP32. On a GPU that supports bf16, bf16-mixed.
Differential privacy keeps FP32: Opacus clips per-image gradients, and the privacy figures were measured so.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: CPU flags (Linux /proc/cpuinfo names) under which bf16 autocast is native and fast.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The flags of :data:`BF16_CPU_FLAGS` this CPU has (empty when none, or where /proc/cpuinfo is absent).
    ``FEDXR_CPU_BF16=0`` hides them (force FP32 on such a CPU), ``=1`` claims them (a CPU this check misses)."""
    forced = os.environ.get("FEDXR_CPU_BF16")
    if forced in ("0", "1"):
        return ("FEDXR_CPU_BF16=1",) if forced == "1" else ()
    try:
        text = Path("/proc/cpuinfo").read_text()
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


def resolve_precision(requested: str, accelerator: str = "auto", dp: bool = False) -> tuple[str, str]:
    """The Lightning precision a recipe's ``model.precision`` means on this machine, and why (for the records).
    Anything but ``auto`` is taken as written."""
    if requested != "auto":
        return requested, "as the recipe says"
    if dp:
        return "32-true", "privacy.dp: per-image clipping in FP32"
    if _uses_cuda(accelerator):
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"GPU {torch.cuda.get_device_name(0)} supports bf16"
        return "32-true", "this GPU has no bf16"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16-mixed", f"CPU has {', '.join(flags)}"
    return "32-true", "CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than FP32)"
