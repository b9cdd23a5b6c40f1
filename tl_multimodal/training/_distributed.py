"""Which process am I? Rank and world size for runs started by ``accelerate launch`` or ``torchrun``.

One process (a plain ``python`` run) is rank 0 of 1. A process started by a launcher joins its
process group through accelerate's ``PartialState``, on gloo where there is no GPU (``PartialState()``
alone sets up no group for CPU processes started by ``torchrun``, i.e. ``accelerate launch
--multi_gpu`` on a machine without GPUs).

``accelerate launch --cpu --num_processes N`` (accelerate 1.x, without ``--mpirun_hostfile``) starts
ONE process, with ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` set but no ``RANK``/``WORLD_SIZE``.
:func:`relaunch_cpu_processes` turns that into the N processes the user asked for (``torchrun`` on
gloo); :func:`partial_state` refuses to go on as one process in that situation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
_NUM_PROCESSES = re.compile(r"^--num[_-]processes(?:=(.*))?$")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def _accelerate_cpu_single_launch() -> bool:
    """True in the one process ``accelerate launch --cpu --num_processes N`` (N > 1, no MPI) starts."""
    return (_flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and "RANK" not in os.environ
            and not any(v in os.environ for v in _MPI_SIZE_VARS))


def requested_processes(cmdline: list[str]) -> int | None:
    """``N`` of ``--num_processes N`` (or ``--num-processes=N``) in an ``accelerate launch`` command line.

    Args:
        cmdline: The launcher's arguments, e.g. from ``/proc/<pid>/cmdline``.

    Returns:
        N, or None when the command line is not ``accelerate launch`` or does not name N (it came
        from an accelerate config file).
    """
    for i, arg in enumerate(cmdline):
        m = _NUM_PROCESSES.match(arg)
        if m:
            value = m.group(1) if m.group(1) is not None else (cmdline[i + 1] if i + 1 < len(cmdline) else "")
            return int(value) if value.isdigit() and int(value) >= 1 else None
    return None


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def relaunch_cpu_processes(module: str, argv: list[str]) -> int | None:
    """Run ``python -m module argv`` as the N processes ``accelerate launch --cpu --num_processes N`` meant.

    In any other situation this does nothing and returns None. Inside the single process that
    accelerate's "simple launcher" starts for ``--cpu --num_processes N`` (N > 1, no MPI), it reads N
    from the parent ``accelerate launch`` command line, prints one line saying so, and runs the same
    command under ``torch.distributed.run --standalone --nproc_per_node N`` (CPU, gloo, a free port).

    Args:
        module: The module the processes run (``"tl_multimodal"``).
        argv: Its arguments.

    Returns:
        The exit code of the N processes, or None when there was nothing to relaunch.

    Raises:
        RuntimeError: N cannot be read from the launcher's command line; the message names the
            command that works (``accelerate launch --multi_gpu --num_processes N ...``).
    """
    if not _accelerate_cpu_single_launch():
        return None
    n = requested_processes(_parent_cmdline())
    if n is None:
        raise RuntimeError(
            "accelerate launch --cpu with several processes starts only one process here (no MPI), and the "
            "number asked for could not be read from its command line; run `accelerate launch --multi_gpu "
            f"--num_processes N -m {module} ...` instead (torchrun; on a machine without GPUs the N processes "
            "run on CPU over gloo)")
    if n == 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", module, *argv]
    print(f"accelerate launch --cpu started 1 process for --num_processes {n}; relaunching as {n} CPU processes "
          f"with torch.distributed.run (gloo)", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode  # the environment (ACCELERATE_USE_CPU=True) goes along


def partial_state():
    """``accelerate.PartialState()`` for this process, on gloo where there is no GPU.

    Raises:
        RuntimeError: This is the single process of ``accelerate launch --cpu --num_processes N``
            that :func:`relaunch_cpu_processes` did not turn into N processes: going on
            would silently run 1 process where N were asked for.
    """
    import torch
    from accelerate import PartialState

    if _accelerate_cpu_single_launch():
        raise RuntimeError(
            "accelerate launch --cpu --num_processes N started only ONE process (accelerate 1.x needs MPI for "
            "several CPU processes); use `accelerate launch --multi_gpu --num_processes N ...` (torchrun, gloo on "
            "CPU) or `torchrun --nproc_per_node N ...`")
    return PartialState(cpu=_flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` unless launched as several)."""
    import torch.distributed as dist

    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or _accelerate_cpu_single_launch()) and not (
            dist.is_available() and dist.is_initialized()):
        partial_state()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
