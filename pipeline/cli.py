"""Entry-point glue shared by the stage scripts: parse, run, and turn expected errors into clean exits."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipeline import dist
from pipeline.config import ConfigError, parse_cli
from pipeline.manifest import StageError


class TrainingHalted(RuntimeError):
    """Raised after the checkpoint of ``halt_after_step``: the run stops as if killed (no export, no manifest)."""


def run_stage(cfg_cls: type, stage: str, main: Callable[[Any], Any], argv: list[str] | None = None) -> None:
    """Parse ``argv`` into ``cfg_cls`` (preset section ``stage``), call ``main(cfg)``.

    A :class:`ConfigError`, :class:`StageError` or other ``ValueError`` raised for bad input is printed as
    ``error: ...`` (rank 0 only, no traceback) and exits with status 2; :class:`TrainingHalted` (the
    ``--halt_after_step`` resume drill) prints ``halted: ...`` and exits with status 3.  After a stage that succeeded, the
    process group (if one was made) is ended with :func:`pipeline.dist.shutdown` before the interpreter exits.
    """
    try:
        dist.adopt_slurm()  # every rank: under srun, the tasks join one job (or the stage refuses)
        dist.quiet_known_warnings()
        cfg = parse_cli(cfg_cls, argv, stage)
        main(cfg)
    except (ConfigError, StageError, ValueError, dist.SlurmError) as e:
        if dist.is_rank0():
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingHalted as e:
        if dist.is_rank0():
            print(f"halted: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    dist.shutdown()  # every rank (each ends its stage here)
