"""Rank and launcher information, read from the environment (never from ``--local_rank``).

``deepspeed``, ``torchrun`` and ``accelerate launch`` all export ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; plain ``python`` exports none, which means one process of rank 0.
"""

from __future__ import annotations

import os


def rank() -> int:
    """Global rank of this process (0 when not launched by a distributed launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank of this process on its node."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Number of processes of the job (1 under plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    """True on the one process that writes files and logs."""
    return rank() == 0


def launcher() -> str:
    """Which launcher started this process: ``deepspeed``, ``accelerate``, ``torchrun`` or ``python``.

    The engine records the answer in ``$PIPELINE_LAUNCHER`` (as ``name:pid``) before it sets rank variables
    for a plain ``python`` run, so later calls in this process keep giving the launcher that really started
    it; a value inherited from a parent process (another pid) is ignored.
    """
    recorded = recorded_launcher()
    if recorded:
        return recorded
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND") is not None or any(
        k.startswith("ACCELERATE_") and k != "ACCELERATE_USE_CPU" for k in os.environ
    ):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ and "CROSS_RANK" not in os.environ:
        return "torchrun"
    if "RANK" in os.environ and ("CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ):
        return "deepspeed"
    if "RANK" in os.environ:
        return "torchrun"
    return "python"


LAUNCHER_ENV = "PIPELINE_LAUNCHER"


def recorded_launcher() -> str | None:
    """The launcher this very process recorded with :func:`record_launcher`, else ``None``."""
    name, _, pid = os.environ.get(LAUNCHER_ENV, "").partition(":")
    return name if name and pid == str(os.getpid()) else None


def record_launcher(name: str) -> None:
    """Remember ``name`` as this process's launcher (child processes do not inherit the answer)."""
    os.environ[LAUNCHER_ENV] = f"{name}:{os.getpid()}"


def barrier() -> None:
    """Wait for every rank (no-op without an initialised process group).  Every rank must call it."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def shutdown() -> None:
    """End the process group: a barrier, so that no rank closes its connections while another is still in a
    collective, then ``destroy_process_group`` (no-op without a group).  Every rank must call it.

    PyTorch asks for the destroy before exit; a gloo rank left to interpreter shutdown can abort with
    "terminate called without an active exception" (pytorch/pytorch#190489, seen here in two-rank CPU runs)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()  # every rank
        tdist.destroy_process_group()  # every rank


def world_size_source(launcher_name: str | None = None) -> str:
    """Where :func:`world_size` came from, for messages: the variable and the launcher that set it."""
    name = launcher_name or launcher()
    if "WORLD_SIZE" not in os.environ:
        return "one process: no WORLD_SIZE in the environment (plain python)"
    if name == "python":
        return f"WORLD_SIZE={os.environ['WORLD_SIZE']} in the environment (no launcher detected)"
    return f"WORLD_SIZE={os.environ['WORLD_SIZE']} set by the {name} launcher"
