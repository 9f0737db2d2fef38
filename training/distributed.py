"""Multi-process training (``torchrun``, DDP): the one place that joins the process group.

Pretraining (:mod:`contourcl.training.pretrain.trainer`) and fine-tuning
(:mod:`contourcl.training.finetune.engine`) call :func:`init_distributed`; it reads torchrun's
``WORLD_SIZE`` and ``LOCAL_RANK`` and joins with NCCL on CUDA, gloo on CPU. The other helpers are
no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return get_rank() == 0


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (once); ``(rank, local_rank, world_size)``.

    ``(0, 0, 1)`` in a single process. NCCL when CUDA is there and ``device`` is ``None`` or a
    CUDA device (the process's GPU is then ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not is_distributed():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_rank(), local, get_world_size()


def close_distributed() -> None:
    """Leave the process group, if joined."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """The list of every rank's ``obj`` (rank order)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. builds a cache), the other ranks after it (and reuse it)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()
