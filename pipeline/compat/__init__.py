"""Every place the pipeline reaches into another library's internals, each gated on the versions it was verified on.

A workaround here re-implements or patches something DeepSpeed, PyTorch or transformers keep private (a module
global, a private attribute, an optimizer's internal buffers).  Each one asks :func:`gate` first: on a library
version outside :data:`VERIFIED` it is not applied, the library's own path runs instead, and one line (per
workaround and process, rank 0) says so.  The pattern follows litgpt's version-gated workarounds
(``litgpt/constants.py``: ``_TORCH_GREATER_EQUAL_*`` flags read at the call sites).

Modules:

- :mod:`pipeline.compat.fp16_step`: DeepSpeed 0.19's ZeRO-1/2 fp16 optimizer step, without host synchronisations;
- :mod:`pipeline.compat.zero_checks`: multi-tensor overflow and gradient-norm checks patched into DeepSpeed's ZeRO
  optimizers and module globals (``stage_1_and_2``/``stage3``);
- :mod:`pipeline.compat.zero_fragments`: writing masks into DeepSpeed's fp32 master fragments and optimizer state;
- :mod:`pipeline.compat.checkpoint`: DeepSpeed's checkpoint loads with ``weights_only=True`` (the allow-list of
  the classes its files pickle) and the repair of its ZeRO-3 universal load;
- :mod:`pipeline.compat.torch_compat`: the eager forward of a compiled module, cuSPARSELt's algorithm search;
- :mod:`pipeline.compat.hf`: lifting transformers' registered ZeRO-3 config for a block.

To widen a range, run the ``compat`` tests (``pytest -m compat``) on the new version, on CPU and on a GPU host,
and change :data:`VERIFIED`.
"""

from __future__ import annotations

import importlib.metadata

#: library -> (lowest verified version, first version not verified): the range ``[low, high)`` the workarounds
#: were tested on (DeepSpeed 0.19.8; torch 2.13 / transformers 5.24 on CPU, torch 2.11 / transformers 5.17 on
#: the GPU image).  ``pyproject.toml`` pins DeepSpeed to the same range.
VERIFIED: dict[str, tuple[str, str]] = {
    "deepspeed": ("0.19", "0.20"),
    "torch": ("2.11", "2.14"),
    "transformers": ("5.17", "5.25"),
}

_logged: set[str] = set()


def version_of(lib: str) -> str | None:
    """The installed version of ``lib`` (its distribution's metadata), or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(v: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(v).release


def is_verified(lib: str, version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) of ``lib`` lies in its :data:`VERIFIED` range."""
    version = version_of(lib) if version is None else version
    if version is None:
        return False
    low, high = VERIFIED[lib]
    return _release(low) <= _release(version) < _release(high)


def gate(workaround: str, lib: str, fallback: str) -> bool:
    """True when ``workaround`` may run: the installed ``lib`` is a version it was verified on.

    Otherwise prints, once per ``workaround`` in this process (rank 0 only), the line
    ``[compat] <workaround>: <lib> <version> is outside the verified range >=low,<high; <fallback>``
    and returns False; the caller then takes ``lib``'s own path (``fallback`` says which).
    """
    if is_verified(lib):
        return True
    if workaround not in _logged:
        _logged.add(workaround)
        from pipeline import dist

        if dist.is_rank0():
            low, high = VERIFIED[lib]
            print(f"[compat] {workaround}: {lib} {version_of(lib)} is outside the verified range >={low},<{high}; "
                  f"{fallback}", flush=True)
    return False
