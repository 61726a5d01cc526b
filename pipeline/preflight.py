"""Checks of what a stage needs from the machine, made before anything runs.

DeepSpeed builds some of its ops just in time with the system's C++ compiler the first time a training stage
starts: ``deepspeed_shm_comm`` on its CPU accelerator (about 36 s on 2 cores), ``fused_adam`` on CUDA (with
``nvcc`` too).  Without a compiler the stage died inside DeepSpeed with a 40-line traceback; here it stops with
one line saying what to install.  The build is cached under ``$TORCH_EXTENSIONS_DIR`` (the Makefile points it
into the project's venv), so a cached op needs no compiler.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.manifest import StageError

#: the op DeepSpeed always builds at start-up, per accelerator (on CUDA, whether an op is built depends on the
#: config, e.g. FusedAdam, so no start-up refusal is made there; GPU images ship a compiler as a rule)
JIT_OPS = {"cpu": "deepspeed_shm_comm"}


class BuildToolsError(StageError):
    """The machine lacks a tool a stage needs (a C++ compiler for DeepSpeed's just-in-time ops)."""


def cxx_compiler() -> str | None:
    """Path of the C++ compiler torch's extension builder would use (``$CXX``, else ``c++``), or of ``g++`` /
    ``clang++``; ``None`` when there is none."""
    for name in (os.environ.get("CXX") or "c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def extensions_dir() -> Path:
    """Where torch caches just-in-time built extensions: ``$TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions`` (torch's default)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def op_available(name: str) -> bool:
    """True when DeepSpeed needs no build for op ``name``: installed prebuilt, or already in the extension cache."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(name):
            return True
    except ImportError:
        pass
    root = extensions_dir()
    return root.is_dir() and any(root.glob(f"**/{name}/{name}*.so"))


def check_build_tools(device_type: str) -> None:
    """Refuse to start a training stage that would make DeepSpeed build an op without a compiler.

    Raises:
        BuildToolsError: no C++ compiler and the accelerator's op (:data:`JIT_OPS`) neither prebuilt nor cached;
            the message names the op, the cache folder and what to install.
    """
    op = JIT_OPS.get(device_type)
    if op is None or cxx_compiler() is not None or op_available(op):
        return
    raise BuildToolsError(
        f"no C++ compiler found ($CXX, c++, g++ or clang++): DeepSpeed builds its {op} op with one the first time a "
        f"training stage starts on {device_type} (then caches it in {extensions_dir()}); install one, e.g. "
        f"`sudo apt-get install g++` (Debian/Ubuntu) or `conda install -c conda-forge cxx-compiler`, then re-run")
