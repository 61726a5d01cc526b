"""Training health in every precision: settings that cannot train, steps that skip, losses that are not finite.

fp16 has its own rules in :class:`pipeline.train.LossScaleMonitor` (the loss scale at its minimum, overflow
skips above a share of a window, judged over the whole window because a dynamic loss scaler skips a few steps
by design while it calibrates).  In bf16 and fp32 a skipped step, or a non-finite loss, is never normal: the
share is judged over the steps seen so far in the window.  When a rule fires the run stops with
:class:`TrainingHealthError` naming the cause, and the checkpoints saved since the first bad step of the window
are set aside (:func:`set_aside_unhealthy`): their weights may already have diverged.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from pipeline.engine import FP16HealthError

UNHEALTHY = "unhealthy.json"


class TrainingHealthError(FP16HealthError):
    """The run stopped because too many steps were skipped or had a non-finite loss (any precision).

    A subclass of :class:`~pipeline.engine.FP16HealthError`, so callers that turn the fp16 stop into a stage error
    turn this one too."""


def nonfinite_settings(cfg: object, prefix: str = "") -> list[str]:
    """Problems for every float setting of a dataclass config (nested ones included) that is inf or NaN.

    Returns:
        One line per setting, e.g. ``"temperature must be a finite number, got inf"``.
    """
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += nonfinite_settings(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            out.append(f"{prefix}{f.name} must be a finite number, got {v}")
        elif isinstance(v, list | tuple) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            out.append(f"{prefix}{f.name} must hold finite numbers, got {list(v)}")
    return out


def advice(cause: str, precision: str) -> str:
    """The message of a non-fp16 health stop (or of a non-finite loss in any precision): cause and options."""
    return (f"{precision} training stopped: {cause}. Checkpoints saved since the trouble began are set aside "
            f"(their {UNHEALTHY} says why); the newest earlier one is kept. Options: lower the learning rate "
            f"(--lr; a changed --lr is allowed on resume and recorded), check the settings that enter the loss "
            f"(e.g. --temperature, --alpha), or clip harder (--grad_clip); then resume with --resume auto")


class NonFiniteLossWatch:
    """Counts optimizer steps whose (accumulated) loss is not finite, over the last ``window`` steps, on the device.

    :meth:`record` adds no host synchronisation (a write into a device ring buffer); :meth:`count` reads it (one
    wait for the device), so the loop calls it only on steps that already synchronise (log, evaluate, save).
    """

    def __init__(self, window: int, device: torch.device | str):
        self.window = int(window)
        self.flags = torch.zeros(self.window, device=device)
        self.steps = 0

    def record(self, step: int, loss: torch.Tensor) -> None:
        """Mark optimizer step ``step`` (1-based) bad when ``loss`` (a 0-d tensor) is inf or NaN."""
        self.flags[(int(step) - 1) % self.window] = (~torch.isfinite(loss.detach().float())).float()
        self.steps = max(self.steps, int(step))

    def count(self) -> tuple[int, int]:
        """(non-finite steps, steps considered) over the last ``min(window, steps)`` steps."""
        n = min(self.window, self.steps)
        return int(self.flags.sum().item()), n

    def first_bad(self, step: int) -> int | None:
        """The earliest step of the window (ending at ``step``) whose loss was not finite."""
        flags = self.flags.tolist()
        n = min(self.window, self.steps)
        for s in range(step - n + 1, step + 1):
            if flags[(s - 1) % self.window] > 0:
                return s
        return None

    def check(self, step: int, max_fraction: float, precision: str) -> None:
        """Raise when more than ``max_fraction`` of the considered steps had a non-finite loss (in fp16: of the
        whole window, as its overflow rule, so that the loss scaler's own rules speak first).

        Raises:
            TrainingHealthError: naming the count, the window and the step.
        """
        bad, n = self.count()
        if bad and bad > max_fraction * (self.window if precision == "fp16" else n):
            raise TrainingHealthError(advice(
                f"{bad} of the last {n} steps had a non-finite loss (limit: {max_fraction:g} of them) by step {step}",
                precision))


def set_aside_unhealthy(ckpt_dir: str | Path, since_step: int, cause: str) -> list[Path]:
    """Make the checkpoints of steps ``>= since_step`` not resumable: their ``complete.json`` becomes
    ``unhealthy.json`` (with ``cause``), so ``--resume auto`` skips them with a warning.  Rank 0 only.

    Returns:
        The checkpoint directories set aside.
    """
    from pipeline import checkpoint as ckpt
    from pipeline.manifest import atomic_write_json

    complete, _ = ckpt.list_checkpoints(ckpt_dir)
    out = []
    for p in complete:
        s = ckpt._step_of(p.name)
        if s is not None and s >= since_step:
            m = ckpt.marker(p)
            atomic_write_json(p / UNHEALTHY, dict(m, cause=cause, unhealthy_since_step=int(since_step)))
            (p / ckpt.MARKER).unlink()
            out.append(p)
    return out
