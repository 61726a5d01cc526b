"""DeepSpeed checkpoint internals: the classes its files pickle (the ``torch.load`` allow-list), its checkpoint
engine's loader replaced for ``weights_only`` loads, and the repair of its ZeRO-3 universal load; gated on
:data:`pipeline.compat.VERIFIED` ``deepspeed``."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import Any

import torch

from pipeline.compat import gate

#: classes DeepSpeed 0.19 checkpoints pickle beside tensors (module.Class); plain data with no code on load
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)



def safe_classes() -> list[type]:
    """The classes of :data:`SAFE_GLOBALS` this DeepSpeed has (those it lacks are left out)."""
    out = []
    for qual in SAFE_GLOBALS:
        mod, _, name = qual.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out



@contextlib.contextmanager
def deepspeed_safe_loading(ds_engine: Any, safe_load: Callable[..., Any]):
    """While the block runs, ``ds_engine`` loads checkpoint files with ``safe_load(path, map_location=...)``
    (:func:`pipeline.integrity.safe_torch_load`); yields whether it does.

    DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``; on the DeepSpeed versions
    of :data:`pipeline.compat.VERIFIED` the engine's ``checkpoint_engine.load`` is replaced for the block.  On
    others (one line says so) or with another checkpoint engine nothing is replaced: the caller's hash check and
    :func:`pipeline.integrity.assert_no_unsafe_pickle` remain the guard.
    """
    ce = getattr(ds_engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load") or not gate(
            "weights_only loads of DeepSpeed checkpoints", "deepspeed",
            "DeepSpeed loads its files itself, after the pickle scan and the hash check"):
        yield False
        return

    def load(path, map_location=None):
        return safe_load(path, map_location=map_location)

    ce.load = load  # instance attribute shadows the class's method
    try:
        yield True
    finally:
        del ce.load


_GROUP_KEEP = ("params", "lr", "initial_lr", "step")


def _torch_optimizer(engine):
    opt = engine.ds.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO's wrapper holds the torch optimizer


def group_hyperparameters(engine) -> list[dict]:
    """Each torch param group's hyperparameters (all but params, lr, initial_lr, step), for
    :func:`repair_zero3_universal_load`."""
    return [{k: v for k, v in g.items() if k not in _GROUP_KEEP} for g in _torch_optimizer(engine).param_groups]


def repair_zero3_universal_load(engine, groups_before: list[dict]) -> list[str]:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (``DeepSpeedZeroOptimizer_Stage3.
    load_hp_checkpoint_state_from_checkpoint_dir_stage3``); returns what was repaired (for the log).

    1. It copies param group 0's hyperparameters into every group: the no-decay group (norms, biases) gets the
       matrices' ``weight_decay``.  The groups' own values, from this run's configuration (which the checkpoint's
       config hash matches), are put back.
    2. It assigns one and the same ``step`` tensor to every sub-group's Adam state; ``torch.optim.Adam(W)``
       increments each state's ``step`` in place, so the shared counter advances once per sub-group and every
       step's bias correction is wrong.  Each state gets its own copy.

    Both are no-ops where DeepSpeed already does it right.  On a DeepSpeed outside :data:`pipeline.compat.VERIFIED`
    nothing is repaired (DeepSpeed's load stands) and one line says so.  Every rank must call this (no
    communication).
    """
    if not gate("repair of ZeRO-3 universal loads", "deepspeed", "DeepSpeed's ZeRO-3 universal load stands as it is"):
        return []
    opt = _torch_optimizer(engine)
    done = []
    for g, before in zip(opt.param_groups, groups_before):
        changed = {k: (g.get(k), v) for k, v in before.items() if g.get(k) != v}
        if changed:
            g.update(before)
            done.append(f"param group hyperparameters {sorted(changed)}")
    seen: set[int] = set()
    for st in opt.state.values():
        step = st.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                st["step"] = step.clone()
                done.append("shared Adam step")
            seen.add(id(st["step"]))
    return sorted(set(done))
