"""One metrics logger for every stage: rank 0 writes TensorBoard scalars and ``metrics.jsonl``.

Names are fixed across stages (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale``,
``train/skipped_steps``, ``train/tokens_per_s``, ``train/mfu``, ``val/loss``, ``val/ppl``, ``kd/*``,
``prune/*``, ``eval/*``) so that ``tensorboard --logdir results/<run>/tb`` shows the stages side by side.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline import dist


class MetricsLogger:
    """Log scalars and text at a step; a no-op on every rank but 0.

    Args:
        jsonl_path: the stage's ``metrics.jsonl`` (appended to, so a resumed run continues it).
        tb_dir: TensorBoard log directory (``results/<run>/tb/<stage>``); ``None`` for none.
        purge_step: on resume, the first step to be logged again: TensorBoard hides the folder's earlier events at
            steps ``>= purge_step`` (``SummaryWriter(purge_step=...)``), so a replayed step shows once.
    """

    def __init__(self, jsonl_path: str | Path, tb_dir: str | Path | None = None, enabled: bool | None = None,
                 purge_step: int | None = None):
        self.enabled = dist.is_rank0() if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(jsonl_path, "a")
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards this folder's events at steps >= it (a resume replays them)
            self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record scalar ``values`` (name -> number) at ``step``; non-finite numbers are kept in JSON as strings."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        """Record a text (e.g. a generated sample) at ``step``."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))
        self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), tag: text}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` (empty list when the file does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the rows of a ``metrics.jsonl`` logged after ``step`` (a resume replays them); returns rows dropped.
    Rank 0 only.  A row that is not JSON (a line cut by a kill) is dropped too."""
    p = Path(path)
    if not p.is_file():
        return 0
    keep, dropped = [], 0
    for line in p.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(f"{x}\n" for x in keep))
        tmp.replace(p)
    return dropped
