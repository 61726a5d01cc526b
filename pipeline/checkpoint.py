"""Resumable DeepSpeed checkpoints: save every N steps, keep the last K, resume from the newest complete one.

Layout: ``<stage_dir>/checkpoints/step<N>/`` is one DeepSpeed checkpoint (``engine.save_checkpoint``:
model, optimizer with its loss scaler, LR schedule, DeepSpeed's step counters, and our ``client_state``:
step, tokens seen, data position, config hash, world size), plus one ``rng_state_rank<r>.json`` per rank
(Python, NumPy, torch and CUDA generators, in JSON: nothing of a run folder is unpickled beyond what
``weights_only=True`` allows), plus ``complete.json`` written by rank 0 after every rank has returned from the
save.  The marker records every file's size and sha256 (each rank hashes the files it wrote).  A tag without
``complete.json`` was interrupted mid-save; one whose files do not match their records was truncated or changed:
``--resume auto`` skips either with a warning naming the file and takes the newest checkpoint that verifies.
DeepSpeed's files are loaded only after they verify, and through :func:`pipeline.integrity.safe_torch_load`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline import dist, integrity
from pipeline.compat.checkpoint import (
    deepspeed_safe_loading,
    group_hyperparameters,
    repair_zero3_universal_load,
)
from pipeline.compat.torch_compat import set_last_lr
from pipeline.manifest import atomic_write_json

MARKER = "complete.json"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing, incomplete, or made with another world size)."""


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step ``step``: ``step<N>``."""
    return f"step{int(step)}"


def _step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint directories under ``ckpt_dir``, each sorted by step, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return [], []
    tags = sorted((p for p in d.iterdir() if p.is_dir() and _step_of(p.name) is not None),
                  key=lambda p: _step_of(p.name))
    complete = [p for p in tags if (p / MARKER).is_file()]
    incomplete = [p for p in tags if not (p / MARKER).is_file()]
    return complete, incomplete


def marker(path: str | Path) -> dict:
    """The ``complete.json`` of a checkpoint (empty for a universal checkpoint, which has none)."""
    m = Path(path) / MARKER
    return json.loads(m.read_text()) if m.is_file() else {}


def find_resume(ckpt_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint directory to resume from, or ``None`` to start from scratch.

    Args:
        ckpt_dir: the stage's ``checkpoints`` folder.
        resume: ``"none"`` (start from scratch), ``"auto"`` (newest complete checkpoint, ``None`` when there
            is none; newer incomplete ones are skipped with a warning), or a checkpoint directory.

    Raises:
        CheckpointError: when an explicit directory does not exist or is incomplete.
    """
    if resume == "none":
        return None
    if resume == "auto":
        complete, incomplete = list_checkpoints(ckpt_dir)
        newest = _step_of(complete[-1].name) if complete else -1
        for p in incomplete:
            if _step_of(p.name) > newest:
                if (p / "unhealthy.json").is_file():  # set aside by a health stop (pipeline.health)
                    why = json.loads((p / "unhealthy.json").read_text()).get("cause", "")
                    warnings.warn(f"checkpoint {p} was saved while the run was unhealthy ({why}); skipping it",
                                  stacklevel=2)
                    continue
                warnings.warn(f"checkpoint {p} is incomplete (no {MARKER}: interrupted while saving?); skipping it",
                              stacklevel=2)
        return complete[-1] if complete else None
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory; pass a checkpoints/step<N> folder, "
                              f"'auto' or 'none'")
    if not (p / MARKER).is_file() and not (p / "zero").is_dir():  # zero/: a universal checkpoint (ds_to_universal)
        raise CheckpointError(f"--resume {resume}: the checkpoint is incomplete (no {MARKER}: interrupted while "
                              f"saving?); pick an older checkpoint or use --resume auto")
    return p


RNG_FILE = "rng_state_rank{rank}.json"
_RANK_OF = (re.compile(r"pp_rank_(\d+)_"), re.compile(r"^rng_state_rank(\d+)\."))


def file_owner(name: str) -> int:
    """The rank that writes checkpoint file ``name``: ZeRO's ``*pp_rank_<r>_*`` and our ``rng_state_rank<r>.*``
    name it; DeepSpeed's other files (``mp_rank_00_model_states.pt``) are written by rank 0."""
    for pat in _RANK_OF:
        m = pat.search(name)
        if m:
            return int(m.group(1))
    return 0


def _gather(obj):
    """Every rank's ``obj`` (a list in rank order); ``[obj]`` without a process group.  Every rank must call it."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)  # collective: every rank
        return out
    return [obj]


def _own_records(path: Path, rank: int) -> dict[str, dict]:
    return {p.name: integrity.file_record(p) for p in sorted(path.iterdir())
            if p.is_file() and p.name != MARKER and file_owner(p.name) == rank}


def verify(path: str | Path) -> list[str]:
    """Problems of checkpoint ``path`` against its marker's file records (empty: it verifies).

    Each rank checks the files it wrote (:func:`file_owner`); the answers are gathered, so every rank gets the
    same list.  A marker without records (written before they existed) gives one problem saying so.  Every rank
    must call this.
    """
    path = Path(path)
    m = marker(path)
    records = m.get("files")
    if records is None:
        mine = [f"{path / MARKER}: records no file sizes or hashes (made by an older version of the pipeline)"] \
            if dist.is_rank0() else []
    else:
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()) and dist.world_size() > 1:
            names = list(records)  # no process group yet (accelerate makes it later): every rank checks every file
        else:
            names = [n for n in records if file_owner(n) == dist.rank()
                     or (file_owner(n) >= dist.world_size() and dist.is_rank0())]
        mine = integrity.verify_records(path, records, names)
        ws = int(m.get("world_size", 1))
        for r in range(ws):
            if RNG_FILE.format(rank=r) not in records and dist.is_rank0():
                mine.append(f"{path / RNG_FILE.format(rank=r)}: rank {r}'s RNG state is not in the checkpoint")
    return sorted({p for part in _gather(mine) for p in part})


def find_verified_resume(ckpt_dir: str | Path, resume: str) -> Path | None:
    """:func:`find_resume`, then verification: the newest complete checkpoint whose files verify.

    With ``resume="auto"`` a checkpoint that fails :func:`verify` is skipped with a warning naming the file, and
    the next older complete one is tried.  Every rank must call this.

    Raises:
        CheckpointError: when an explicit checkpoint directory does not verify (naming the file).
    """
    first = find_resume(ckpt_dir, resume)
    if first is None:
        return None
    if resume != "auto":
        if not (first / MARKER).is_file():
            return first  # a universal checkpoint: checked file by file before DeepSpeed loads it (load)
        problems = verify(first)
        if problems and not _legacy_ok(problems):
            raise CheckpointError(f"--resume {resume}: the checkpoint does not verify: {problems[0]}"
                                  + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                  + "; pick an older checkpoint or use --resume auto")
        return first
    complete, _ = list_checkpoints(ckpt_dir)
    for p in reversed(complete):
        problems = verify(p)
        if not problems or _legacy_ok(problems):
            return p
        if dist.is_rank0():
            warnings.warn(f"checkpoint {p} does not verify, skipping it: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), stacklevel=2)
    return None


def _legacy_ok(problems: list[str]) -> bool:
    """A checkpoint of an older version (no records): warned about, then loaded through the safe loader only."""
    if len(problems) == 1 and "older version" in problems[0]:
        if dist.is_rank0():
            warnings.warn(f"{problems[0]}: it is not verified; its files are loaded with weights_only=True only",
                          stacklevel=3)
        return True
    return False


def rng_state() -> dict:
    """This process's random generators: Python, NumPy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Save checkpoint ``step<step>`` and keep only the newest ``keep_last`` complete ones.

    Every rank must call this: DeepSpeed's save is collective, each rank writes its RNG file, and rank 0
    writes the ``complete.json`` marker only after a barrier, then deletes the oldest checkpoints.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    path = ckpt_dir / tag
    if dist.is_rank0() and (path / MARKER).exists():
        (path / MARKER).unlink()  # re-saving a step: it is incomplete until this save finishes
    dist.barrier()  # every rank
    client_state = dict(client_state, step=int(step), world_size=engine.world_size,
                        # what DeepSpeed's ds_to_universal requires of the client (else: "Required
                        # universal_checkpoint_info state is missing"); data parallelism only, no patterns
                        universal_checkpoint_info={"universal_checkpoint_version": 0.4})
    try:
        engine.save_checkpoint(ckpt_dir, tag, client_state)  # collective: every rank
        integrity.write_json_state(path / RNG_FILE.format(rank=engine.rank), integrity.rng_state_json())
    except (RuntimeError, OSError) as e:
        if integrity.is_disk_full(e, path):
            raise CheckpointError(integrity.disk_full_message(path, f"checkpoint {tag}")) from e
        raise
    dist.barrier()  # every rank: all shards and RNG files are on disk
    records = _gather(_own_records(path, engine.rank))  # collective: each rank hashes the files it wrote
    if dist.is_rank0():
        files = {k: v for part in records for k, v in part.items()}
        atomic_write_json(path / MARKER, {"step": int(step), "world_size": engine.world_size,
                                          "zero_stage": engine.zero_stage, "precision": engine.precision,
                                          "config_hash": client_state.get("config_hash"),
                                          "lr": client_state.get("lr"), "health": client_state.get("health"),
                                          "files": files})
        complete, _ = list_checkpoints(ckpt_dir)
        if keep_last > 0:
            for old in complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # every rank
    return path


def check_world_size(path: str | Path, world_size: int, ds_config: dict) -> None:
    """Refuse a checkpoint written by another number of ranks unless the config loads universal checkpoints.

    Raises:
        CheckpointError: naming both sizes and the conversion route (DeepSpeed's ``ds_to_universal``).
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        return  # a universal checkpoint made by ds_to_universal: DeepSpeed loads it at any world size
    saved = json.loads((path / MARKER).read_text())
    saved_ws = int(saved["world_size"])
    universal = bool((ds_config.get("checkpoint") or {}).get("load_universal", False))
    if saved_ws != world_size and not universal:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_ws} rank(s), this run has {world_size}: ZeRO shards "
            f"are per rank and cannot be loaded as they are. Either resume with {saved_ws} rank(s), or convert it to "
            f"a universal checkpoint (`python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} "
            f"--output_folder {path}_universal`), add \"checkpoint\": {{\"load_universal\": true}} to the DeepSpeed "
            f"config, and resume with --resume {path}_universal (keep the global batch: change --grad_accum so that "
            f"micro_batch_size x grad_accum x world_size stays the same)")


def load(engine, path: str | Path) -> dict:
    """Resume ``engine`` from the checkpoint directory ``path``; returns its ``client_state``.

    Restores model, optimizer, loss scaler, LR schedule and DeepSpeed's counters, and this rank's RNG.
    Every rank must call this.

    Raises:
        CheckpointError: when the checkpoint was written by a different number of ranks and the DeepSpeed
            config does not load universal checkpoints; the message names both sizes and the conversion.
    """
    path = Path(path)
    check_world_size(path, engine.world_size, engine.config)
    if not (path / MARKER).is_file():  # a universal checkpoint: DeepSpeed reads its files with torch.load itself
        try:
            for f in sorted(path.rglob("*.pt")):
                integrity.assert_no_unsafe_pickle(f)  # scans the pickle without running it
        except integrity.UnsafeFileError as e:
            raise CheckpointError(str(e)) from None
    universal_z3 = not (path / MARKER).is_file() and (path / "zero").is_dir() and engine.zero_stage == 3
    groups_before = group_hyperparameters(engine) if universal_z3 else None
    try:
        # weights_only=True for DeepSpeed's own loads
        with deepspeed_safe_loading(engine.ds, integrity.safe_torch_load):
            client_state = engine.load_checkpoint(path.parent, path.name)  # collective: every rank
    except integrity.UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if universal_z3:
        repaired = repair_zero3_universal_load(engine, groups_before)
        if repaired and dist.is_rank0():
            print(f"[checkpoint] ZeRO-3 universal load of {path}: repaired {', '.join(repaired)} "
                  f"(DeepSpeed {_ds_version()})", flush=True)
    rng_file = path / RNG_FILE.format(rank=engine.rank)
    if rng_file.is_file():
        integrity.set_rng_state_json(integrity.read_json_state(rng_file))
    elif (path / MARKER).is_file() and int(marker(path).get("world_size", 0)) == engine.world_size:
        old = path / f"rng_state_rank{engine.rank}.pt"
        what = f"{old.name} is a pickle of an older version, not loaded" if old.is_file() else "missing"
        warnings.warn(f"checkpoint {path}: rank {engine.rank}'s RNG state {rng_file.name} is {what}; "
                      f"this rank's random generators are not restored (dropout and sampling differ from an "
                      f"uninterrupted run)", stacklevel=2)
    return client_state


def override_peak_lr(engine, lr: float) -> None:
    """After a resume: make ``lr`` the schedule's peak LR instead of the checkpoint's (``--lr`` changed on resume).

    The LR schedule (``LambdaLR``) restored its ``base_lrs`` from the checkpoint; they, the param groups'
    ``initial_lr`` and the LR of the step to come are set from ``lr`` and the schedule's multiplier at its step.
    Every rank must call this (no communication)."""
    sched = engine.ds.lr_scheduler
    if sched is None:
        return
    sched.base_lrs = [float(lr) for _ in sched.base_lrs]
    mults = [f(sched.last_epoch) for f in sched.lr_lambdas]
    for group, mult in zip(sched.optimizer.param_groups, mults):
        group["initial_lr"] = float(lr)
        group["lr"] = float(lr) * mult
    set_last_lr(sched, [g["lr"] for g in sched.optimizer.param_groups])


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__
