"""Rank and launcher information, read from the environment (never from ``--local_rank``).

``deepspeed``, ``torchrun`` and ``accelerate launch`` all export ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; plain ``python`` exports none, which means one process of rank 0.  Under Slurm's ``srun``
(one task per GPU) each task sees only ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``:
:func:`adopt_slurm` turns those into the same variables, so the tasks join one job instead of running N
independent copies into one run folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings


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


# ---------------------------------------------------------------------------------------------
# Slurm (srun, one task per rank)


class SlurmError(RuntimeError):
    """Several Slurm tasks that cannot form one job (no rendezvous address)."""


def first_slurm_host(nodelist: str) -> str | None:
    """The first host name of a Slurm node list (``node[01-03,07],gpu5`` -> ``node01``), or ``None``.

    ``scontrol show hostnames`` expands the list where Slurm's tools are installed; otherwise the first entry
    is expanded here (one bracket group, ranges keep their zero padding)."""
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\]([^,]*))?", nodelist.strip())
    if not m:
        return None
    prefix, group, suffix = m.group(1), m.group(2), m.group(3) or ""
    if group is None:
        return prefix
    return prefix + group.split(",")[0].split("-")[0] + suffix


def slurm_rank_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The rank variables of a task that ``srun`` started as one of several, or ``None`` when none are needed.

    ``None`` when a launcher already set ``RANK`` (e.g. ``srun`` starting one ``torchrun``/``deepspeed`` per
    node), outside Slurm, for a one-task step, and in the batch script itself (no ``SLURM_STEP_ID``: that is
    one process, whatever ``--ntasks`` the allocation has).  Otherwise: ``RANK`` = ``SLURM_PROCID``,
    ``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), ``LOCAL_RANK`` = ``SLURM_LOCALID``,
    ``MASTER_ADDR`` from the environment or the first host of the step's node list, ``MASTER_PORT`` from the
    environment or ``10000 + SLURM_JOB_ID % 20000`` (the same on every task, different between jobs).

    Raises:
        SlurmError: several tasks but no ``MASTER_ADDR`` and no node list to take it from.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
    if ntasks <= 1 or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
    if not addr:
        raise SlurmError(
            f"srun started {ntasks} tasks (SLURM_NTASKS={ntasks}) but no rendezvous can be formed: no MASTER_ADDR and "
            f"no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to take the first host from; export MASTER_ADDR=<first node's "
            f"host name> (and MASTER_PORT=<a free port>) before srun, or run one task (srun --ntasks=1) per launcher")
    port = env.get("MASTER_PORT") or str(10000 + int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or 0) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(ntasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": addr, "MASTER_PORT": port}


def adopt_slurm() -> bool:
    """Under ``srun`` with several tasks, set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
    ``MASTER_PORT`` from Slurm's variables (:func:`slurm_rank_env`) and record the launcher as ``slurm``;
    returns whether it did.  Every task must call it before anything reads its rank.

    Raises:
        SlurmError: see :func:`slurm_rank_env`.
    """
    found = slurm_rank_env()
    if found is None:
        return False
    os.environ.update(found)
    record_launcher("slurm")
    return True


def quiet_known_warnings() -> None:
    """Silence warnings a user cannot act on, printed once per rank: torch 2.13's FutureWarning for
    ``torch.distributed.all_gather_into_tensor``, which DeepSpeed 0.19.8 still calls (its own code, not ours)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def world_size_source(launcher_name: str | None = None) -> str:
    """Where :func:`world_size` came from, for messages: the variable and the launcher that set it."""
    name = launcher_name or launcher()
    if "WORLD_SIZE" not in os.environ:
        return "one process: no WORLD_SIZE in the environment (plain python)"
    if name == "python":
        return f"WORLD_SIZE={os.environ['WORLD_SIZE']} in the environment (no launcher detected)"
    return f"WORLD_SIZE={os.environ['WORLD_SIZE']} set by the {name} launcher"
