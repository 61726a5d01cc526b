"""Resumable DeepSpeed checkpoints: save every N steps, keep the last K, resume from the newest complete one.

Layout: ``<stage_dir>/checkpoints/step<N>/`` is one DeepSpeed checkpoint (``engine.save_checkpoint``:
model, optimizer with its loss scaler, LR schedule, DeepSpeed's step counters, and our ``client_state``:
step, tokens seen, data position, config hash, world size), plus one ``rng_state_rank<r>.pt`` per rank
(Python, NumPy, torch and CUDA generators), plus ``complete.json`` written by rank 0 after every rank has
returned from the save.  A tag without ``complete.json`` was interrupted mid-save: ``--resume auto``
skips it with a warning and takes the newest complete one.
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

from pipeline import dist
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
    client_state = dict(client_state, step=int(step), world_size=engine.world_size)
    engine.save_checkpoint(ckpt_dir, tag, client_state)  # collective: every rank
    torch.save(rng_state(), path / f"rng_state_rank{engine.rank}.pt")
    dist.barrier()  # every rank: all shards and RNG files are on disk
    if dist.is_rank0():
        atomic_write_json(path / MARKER, {"step": int(step), "world_size": engine.world_size,
                                          "zero_stage": engine.zero_stage, "precision": engine.precision,
                                          "config_hash": client_state.get("config_hash")})
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
    saved_ws = int(json.loads((path / MARKER).read_text())["world_size"])
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
    client_state = engine.load_checkpoint(path.parent, path.name)  # collective: every rank
    rng_file = path / f"rng_state_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
