"""File integrity and safe loading: what a run folder may hold before anything in it is loaded.

A run folder copied from elsewhere must never execute code, and a half-written file must be found before it is
loaded, not by the loader's crash.  This module holds:

- :func:`file_record` / :func:`verify_records`: each file's size and sha256, recorded when it is written and
  compared before it is read (the checkpoint's ``complete.json`` holds the records of every rank's files).
- :func:`safe_torch_load`: ``torch.load(weights_only=True)`` with the few DeepSpeed classes its checkpoints hold
  allowed (:data:`SAFE_GLOBALS`); anything else is an :class:`UnsafeFileError` naming the file and the object.
- :func:`assert_no_unsafe_pickle`: the same allowlist checked by scanning a file's pickle without running it
  (``torch.serialization.get_unsafe_globals_in_checkpoint``), for files another library loads itself.
- (:func:`pipeline.compat.checkpoint.deepspeed_safe_loading` makes DeepSpeed's checkpoint engine load with
  :func:`safe_torch_load`; the allow-list of DeepSpeed classes lives beside it, in :mod:`pipeline.compat`.)
- :func:`write_json_state` / :func:`read_json_state`: random-generator state in JSON instead of a pickle.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.compat.checkpoint import SAFE_GLOBALS, safe_classes
from pipeline.manifest import file_sha256


class UnsafeFileError(RuntimeError):
    """A file would run code when loaded (a pickle holding objects beyond tensors and plain data)."""


def file_record(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    return {"size": os.path.getsize(path), "sha256": file_sha256(path)}


def verify_records(folder: str | Path, records: dict[str, dict], names: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) of ``folder``'s files against their ``records``.

    Args:
        folder: the directory the names are relative to.
        records: name -> :func:`file_record` as written.
        names: check only these names (default: all); a name with no record is a problem.

    Returns:
        An empty list when every file is there with its recorded size and sha256.
    """
    folder = Path(folder)
    out = []
    for name in records if names is None else names:
        rec = records.get(name)
        p = folder / name
        if rec is None:
            out.append(f"{p}: no size/sha256 recorded for it")
        elif not p.is_file():
            out.append(f"{p}: missing")
        elif p.stat().st_size != int(rec["size"]):
            out.append(f"{p}: {p.stat().st_size} bytes, {rec['size']} recorded (truncated or changed)")
        elif file_sha256(p) != rec["sha256"]:
            out.append(f"{p}: sha256 differs from the recorded one (changed or corrupted)")
    return out


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing the classes of :data:`SAFE_GLOBALS`.

    Raises:
        UnsafeFileError: when the file holds any other object (a planted pickle, a model pickled whole), naming
            the file and what it holds; nothing in it has run.
    """
    try:
        with torch.serialization.safe_globals(safe_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(unsafe_message(path, str(e).splitlines()[0][:300])) from None


def unsafe_message(path: str | Path, what: str) -> str:
    return (f"unsafe file: {path} is a pickle that would run code or build objects beyond tensors when loaded "
            f"({what}); it was not loaded. Files in a run folder are loaded only with weights_only=True; remove "
            f"the file, or re-make it with the stage that writes it")


def assert_no_unsafe_pickle(path: str | Path) -> None:
    """Refuse a torch file whose pickle names a global outside torch's and :data:`SAFE_GLOBALS`'s allowlist.

    Reads the pickle's opcodes without running them (``torch.serialization.get_unsafe_globals_in_checkpoint``).

    Raises:
        UnsafeFileError: naming the file and the globals.
    """
    try:
        bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip checkpoint: an old-format or planted pickle
        raise UnsafeFileError(unsafe_message(path, f"not a torch zip checkpoint: {type(e).__name__}")) from None
    bad = [g for g in bad if g not in SAFE_GLOBALS]
    if bad:
        raise UnsafeFileError(unsafe_message(path, f"it names {', '.join(bad[:5])}"))


# ---------------------------------------------------------------------------------------------
# random generators in JSON


def rng_state_json() -> dict:
    """Python, NumPy, torch CPU and (when present) CUDA generator states as JSON-able data."""
    v, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [v, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state_json(state: dict) -> None:
    """Restore generators saved by :func:`rng_state_json`."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json_state(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` (flushed and fsynced)."""
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def read_json_state(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# disk full


def is_disk_full(exc: BaseException, folder: str | Path, need_bytes: int = 1 << 20) -> bool:
    """True when ``exc`` is (or follows from) a write that found no space: ``ENOSPC``/``EDQUOT`` anywhere in its
    chain, or PyTorch's zip writer's bare "unexpected pos" with less than ``need_bytes`` free in ``folder``."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if "unexpected pos" in str(exc) or "PytorchStreamWriter failed" in str(exc):
        try:
            return shutil.disk_usage(folder).free < need_bytes
        except OSError:
            return False
    return False


def disk_full_message(folder: str | Path, what: str) -> str:
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on device while writing {what} to {folder} ({free}); free space there (or point "
            f"--results_dir at a larger disk, or lower --keep_last) and resume with --resume auto")


# ---------------------------------------------------------------------------------------------
# model folders


class ModelFileError(RuntimeError):
    """A model folder's files disagree (config.json against the weights) or are broken."""


def remake_hint(model_dir: str | Path) -> str:
    """The make target that re-makes a stage's model folder (``results/<run>/<NN_stage>/model``)."""
    d = Path(model_dir).resolve()
    stage_dir = d.parent
    stage = stage_dir.name.split("_", 1)[-1] if "_" in stage_dir.name else None
    if stage in ("pretrain", "prune", "distill"):
        return f"re-make it with `make {stage} RUN={stage_dir.parent.name}` (add --overwrite / remove {stage_dir})"
    return "re-make it with the stage that wrote it"


def load_causal_lm(model_dir: str | Path, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)`` with its failures named.

    Raises:
        UnsafeFileError: a pickle in place of the weights that holds more than tensors (transformers loads ``.bin``
            files with ``weights_only=True``, so nothing in it ran).
        ModelFileError: ``config.json`` disagrees with the weights (shapes, missing tensors), or a weights file
            is truncated; the message names the files and the make target that re-makes the folder.
    """
    from transformers import AutoModelForCausalLM

    d = Path(model_dir)
    for f in sorted(d.glob("*.bin")) + sorted(d.glob("*.pt")) + sorted(d.glob("*.pth")):
        assert_no_unsafe_pickle(f)  # before transformers sees it: the scan runs nothing
    try:
        return AutoModelForCausalLM.from_pretrained(d, **kwargs)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(unsafe_message(d, str(e).splitlines()[0][:200])) from None
    except (RuntimeError, ValueError, OSError) as e:
        text = str(e)
        if "weights only" in text.lower() or "WeightsUnpickler" in text:
            raise UnsafeFileError(unsafe_message(d, text.splitlines()[0][:200])) from None
        weights = ", ".join(p.name for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))) or "none"
        if "size mismatch" in text or "shape" in text or "mismatch" in text.lower():
            raise ModelFileError(
                f"{d / 'config.json'} disagrees with the weights in {d} ({weights}): "
                f"{' '.join(text.split())[:300]}; {remake_hint(d)}") from None
        if "header" in text.lower() or "deserializ" in text.lower() or "incomplete" in text.lower():
            raise ModelFileError(f"the weights in {d} ({weights}) cannot be read (truncated or corrupted: "
                                 f"{' '.join(text.split())[:200]}); {remake_hint(d)}") from None
        raise
