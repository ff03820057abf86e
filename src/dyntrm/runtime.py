"""Device, dtype and distributed set-up. Nothing else in the project hard-codes a device.

``torchrun`` is detected from its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): gloo on CPU, nccl on
CUDA. The device is CUDA, then MPS, then CPU (override with ``DYNTRM_DEVICE``). bf16 autocast is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self, enabled: bool = True):
        """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU and tests run fp32)."""
        if enabled and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce (identity when not distributed)."""
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device() -> torch.device:
    forced = os.environ.get("DYNTRM_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(threads: int = 0) -> Runtime:
    """Initialise the process group when launched by torchrun; pick the device."""
    if threads > 0:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(pick_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device()
    if device.type == "cpu" and threads <= 0:  # share the cores between the local processes
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP reducer held only by a reference cycle must go before its process group (gloo aborts)
        dist.barrier()  # ranks leave together: gloo can abort a rank torn down while a peer still works
        dist.destroy_process_group()
