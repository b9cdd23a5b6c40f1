"""Which process am I? Rank and world size for runs started by ``accelerate launch`` or ``torchrun``.

One process (a plain ``python`` run) is rank 0 of 1. A process started by a launcher joins its
process group through accelerate's ``PartialState``, on gloo where there is no GPU (``PartialState()``
alone sets up no group for CPU processes started by ``torchrun``, i.e. ``accelerate launch
--multi_gpu`` on a machine without GPUs).
"""

from __future__ import annotations

import os


def partial_state():
    """``accelerate.PartialState()`` for this process, on gloo where there is no GPU."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` unless launched as several)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        partial_state()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
