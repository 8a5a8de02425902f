"""Several training processes inside one site: Lightning DDP under ``torchrun``, with NVFlare between sites.

NVFlare launches a site's client script as one external process. When the recipe asks for more than one
device per site, that process is ``torchrun``, which starts one worker per device; Lightning's ``ddp``
strategy then trains across them. Only global rank 0 has a session with NVFlare (its Client API
refuses the others): rank 0 decides whether the federation is still running and what the current task
is, and broadcasts that to every rank, so all ranks enter the same validate/fit calls together (DDP
collectives would hang otherwise). The model itself reaches the other ranks through NVFlare's
Lightning callback, which broadcasts it with the trainer's strategy.

Torch-free at import: the job builder uses :func:`launch_command` without torch. How many processes a site runs
and whether that is DDP are the recipe's facts (``fedxr/devices.py``: recipe validation reads them too).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any


#: torchrun's own environment (https://pytorch.org/docs/stable/elastic/run.html#environment-variables).
RANK_ENV, WORLD_ENV, LOCAL_RANK_ENV, TORCHRUN_ENV = "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"


def launch_command(python: str, processes: int, ddp: bool = False) -> str:
    """The command NVFlare prefixes the client script with. Several processes (or a DDP strategy on one
    device) run under ``torchrun --standalone``: its rendezvous binds a free port of its own, so every site
    (several on one machine in the simulator and in POC) gets its own master port without port planning."""
    if processes <= 1 and not ddp:
        return f"{python} -u"
    return f"{python} -u -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node={processes}"


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the torchrun agent) dies. torchrun starts its
    workers in sessions of their own, so when NVFlare has to SIGKILL the agent's process group (a stuck
    or failed site), the workers would otherwise live on, holding memory and devices."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not glibc: the agent's own SIGTERM handling still stops the workers
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class SiteRanks:
    """This process's place among its site's training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = None

    @property
    def is_control(self) -> bool:
        """The rank that talks to NVFlare."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls, accelerator: str, wait_s: float) -> "SiteRanks":
        """Join the site's process group when started by torchrun (else a single process: rank 0 of 1).

        The default group is created here, with the backend Lightning would choose (NCCL on CUDA, else
        gloo), so that the control messages below can flow before the first ``fit``; Lightning finds it
        initialised and uses it. Control messages go over a separate gloo group: they are small Python
        objects, and gloo needs no device. The other ranks wait in that group while rank 0 waits for
        NVFlare's next task (the other hospitals' training, a vanished hospital's deadline, the final
        evaluation), so its timeout is ``wait_s`` (the whole job's deadline), not torch's 30 minutes; a
        rank that dies still fails the others at once."""
        if os.environ.get(TORCHRUN_ENV):
            die_with_parent()  # also a single worker under torchrun runs in a session of its own
        world = int(os.environ.get(WORLD_ENV, "1"))
        if world <= 1:
            return cls()
        import datetime

        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get(LOCAL_RANK_ENV, "0"))
        cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(wait_s, 1800)))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, _group=group)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a no-op in a single process)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_control else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def finish(self) -> None:
        """Leave the process group (every rank together), so no rank waits on a departed peer."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier(group=self._group)
            dist.destroy_process_group()
