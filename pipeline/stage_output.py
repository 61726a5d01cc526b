"""One way to write a stage's output folder, used by every stage.

A stage's output is ``results/<run>/<NN_stage>/`` with ``manifest.json`` written last (its presence, with
``"complete": true``, is what ``make`` and the next stage trust), beside it a TensorBoard folder
``results/<run>/tb/<stage>``.  :class:`StageOutput` does the parts every stage shares:

1. :meth:`StageOutput.check`: before anything is written, an existing complete output made with another
   configuration (another config hash) is refused unless ``--overwrite``;
2. writing, one of two ways:

   - :meth:`StageOutput.staging` (stages that are written whole: data, prune, evaluate and the classifier's):
     everything goes into temporary folders beside the output and its TensorBoard folder; :meth:`Staging.publish`
     swaps them into place only when all succeeded (the old output kept aside until the new one is in place),
     then writes the manifest.  A failure or a kill leaves the previous output (or nothing) and no stray folder
     that a later run would trust;
   - :meth:`StageOutput.begin_in_place` (resumable stages, which train and checkpoint: pretrain, distill, the
     controls, classify): the manifest goes first (the stage is incomplete until it is written again); a fresh
     start deletes the old metrics, checkpoints and TensorBoard folder, a resume drops the metrics rows past the
     resumed step (they are replayed);
3. the manifest, last (:func:`pipeline.manifest.write_manifest`).

Only rank 0 writes: the methods that write are called by rank 0 alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST, prepare_output_dir


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` (kept aside until ``src`` is in place)."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@dataclass
class Staging:
    """The temporary folders of one staged write: write the output into :attr:`dir` and TensorBoard events into
    :attr:`tb_dir` (``None`` when the stage logs none), then :meth:`publish`."""

    output: StageOutput
    dir: Path
    tb_dir: Path | None
    published: bool = False

    def publish(self, write_manifest: Callable[[Path], Any] | None = None) -> Any:
        """Swap the staged folders into place, the TensorBoard folder first, then write the manifest with
        ``write_manifest(output_dir)`` (last); returns what it returns.  The old output's manifest is removed
        before the swap, so no moment shows the new files under the old manifest.  Rank 0 only."""
        out = self.output
        (out.dir / MANIFEST).unlink(missing_ok=True)
        if self.tb_dir is not None and out.tb_dir is not None:
            if self.tb_dir.exists():
                replace_dir(self.tb_dir, out.tb_dir)
            else:  # the stage logged nothing to TensorBoard this time: an older folder is not this output's
                shutil.rmtree(out.tb_dir, ignore_errors=True)
        replace_dir(self.dir, out.dir)
        self.published = True
        return write_manifest(out.dir) if write_manifest is not None else None


class StageOutput:
    """A stage's output folder and its TensorBoard folder (see the module docstring for the protocol).

    Args:
        out_dir: the stage directory, e.g. ``results/<run>/03_prune``.
        tb_dir: its TensorBoard folder (``results/<run>/tb/<stage>``) or ``None``.
    """

    def __init__(self, out_dir: str | Path, tb_dir: str | Path | None = None):
        self.dir = Path(out_dir)
        self.tb_dir = Path(tb_dir) if tb_dir is not None else None

    def check(self, config_hash: str, overwrite: bool, stage: str, also_accept: tuple[str, ...] = ()) -> None:
        """Refuse, before anything is written, an existing complete output of another configuration unless
        ``overwrite`` (:func:`pipeline.manifest.prepare_output_dir`); ``also_accept`` lists other hashes of the
        same configuration (computed by an earlier version of the stage).  Changes no file.

        Raises:
            StageError: naming the directory, both configurations' hashes and the fix (``--overwrite``).
        """
        prepare_output_dir(self.dir, config_hash, overwrite, stage, also_accept=also_accept)

    @contextmanager
    def staging(self) -> Iterator[Staging]:
        """Fresh temporary folders beside the output (``.<name>.partial-<pid>``) and beside its TensorBoard
        folder; removed on leaving unless :meth:`Staging.publish` moved them into place (an exception inside
        leaves the previous output as it was).  Rank 0 only."""
        tmp = _temporary(self.dir)
        tb_tmp = _temporary(self.tb_dir) if self.tb_dir is not None else None
        for p in (tmp, tb_tmp):
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir(parents=True)
        staged = Staging(self, tmp, tb_tmp)
        try:
            yield staged
        finally:
            for p in (tmp, tb_tmp):
                if p is not None:
                    shutil.rmtree(p, ignore_errors=True)

    def begin_in_place(self, resume_step: int | None, also_fresh: Iterable[str | Path] = ()) -> None:
        """Ready the folder of a resumable stage: remove the manifest (incomplete until written again); with
        ``resume_step`` ``None`` (a fresh start) delete the old ``metrics.jsonl``, the TensorBoard folder and
        ``also_fresh`` (the checkpoints), else drop the ``metrics.jsonl`` rows logged after ``resume_step``
        (TensorBoard's are dropped by the logger's ``purge_step``).  Rank 0 only."""
        from pipeline.metrics import truncate_metrics

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)
        if resume_step is None:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
            for p in also_fresh:
                shutil.rmtree(p, ignore_errors=True)
            if self.tb_dir is not None:
                shutil.rmtree(self.tb_dir, ignore_errors=True)
        else:
            truncate_metrics(self.dir / "metrics.jsonl", resume_step)


__all__ = ["StageOutput", "Staging", "replace_dir"]
