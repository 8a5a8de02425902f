"""How many training processes a site runs, and whether they train with DDP: facts of the recipe's ``model``
section that recipe validation, the job builder and the client script all read (torch-free, no imports)."""

from __future__ import annotations


def site_processes(devices: int | str) -> int:
    """Training processes per site for ``model.devices``: an integer is that many (one per device);
    ``auto`` is one process inside a federation (Lightning's own "all devices" launcher would re-run the
    client script behind NVFlare's back, so a site's device count is always stated in the recipe)."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return max(1, int(devices))
    return 1


def runs_ddp(devices: int | str, strategy: str) -> bool:
    """Whether a site trains with DDP under torchrun: several devices, or a DDP strategy on one (the one
    definition the job's launch command and the client's Trainer both follow)."""
    return site_processes(devices) > 1 or "ddp" in strategy
