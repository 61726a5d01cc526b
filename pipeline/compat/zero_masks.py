"""Keeping pruned weights at zero inside DeepSpeed's optimizer state: fp32 master fragments (ZeRO-1/2 and the bf16
optimizer, ``param._hp_mapping``), ZeRO-3 partitions (``ds_tensor``, ``_z3_optimizer``) and Adam's moments.

Verified on DeepSpeed 0.19 (:data:`pipeline.compat.VERIFIED`); on other versions :class:`MaskKeeper` uses DeepSpeed's
public ``safe_{get,set}_full_*`` API instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.compat import gate


def _named_params_all(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, tied parameters under every name they have in ``state_dict()``."""
    return dict(module.named_parameters(remove_duplicate=False))


class MaskKeeper:
    """Re-zero pruned weights after each optimizer step, everywhere a weight lives in a DeepSpeed run.

    A pruned weight revives if only the module's copy is zeroed: with fp16/bf16, DeepSpeed keeps fp32
    master weights and copies them into the module after each step; and Adam's ``exp_avg``/
    ``exp_avg_sq`` keep moving a weight whose gradient alone is masked. So after each step this zeroes,
    where the mask is 0:

    - the fp32 master weights and every optimizer state tensor of the parameter's shape (Adam:
      ``exp_avg``, ``exp_avg_sq``),
    - the module's weights (fp16/bf16/fp32), which are what ``save_checkpoint`` and the export read.

    Per ZeRO stage, only this rank's share is touched and nothing is communicated:

    - ZeRO-3: the local partitions, through ``deepspeed.utils.safe_get_local_fp32_param`` /
      ``safe_set_local_fp32_param`` / ``safe_{get,set}_local_optimizer_state``, plus ``param.ds_tensor``
      (the module's partition) and, for parameters kept gathered (``stage3_param_persistence_threshold``),
      the gathered ``param.data``. Rank ``r`` of the parameter's partition group holds elements
      ``[r·n, (r+1)·n)`` of the flattened weight (``n = param.ds_tensor.numel()``, zero-padded at the end).
    - ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fragments that ``safe_set_full_fp32_param`` /
      ``safe_set_full_optimizer_state`` write (``param._hp_mapping.get_hp_fragment(key)``, the
      ``deepspeed.utils.tensor_fragment`` API), in place, which avoids the all-reduce of
      ``safe_get_full_*``; the module's weight is whole on every rank.
    - no ZeRO with an fp32 torch optimizer: the parameter itself and ``optimizer.state[param]``.

    On a DeepSpeed version outside :data:`pipeline.compat.VERIFIED` none of DeepSpeed's internals is touched: the
    masters and Adam's ``exp_avg``/``exp_avg_sq`` go through DeepSpeed's public ``safe_get_full_*`` /
    ``safe_set_full_*`` (an all-reduce per tensor under ZeRO) and ZeRO-3 module weights through
    ``deepspeed.zero.GatheredParameters`` (rank 0 writes, DeepSpeed re-partitions); one line says so.

    Gradients are not masked: a pruned weight's gradient still counts in the gradient norm (and
    clipping) and moves Adam's state for one step, which this then zeroes again.

    Args:
        engine: the ``deepspeed`` engine (or, without DeepSpeed, the module), after ``initialize``.
        masks: parameter name (as in ``model.state_dict()``) -> bool/uint8 tensor of the weight's full
            shape, nonzero = kept (the stage-03 ``masks.safetensors``).
        optimizer: the torch optimizer when ``engine`` is a plain module (ignored otherwise).

    Raises:
        ValueError: a mask names no parameter of the model, or its shape differs from the weight's;
            or the optimizer keeps master weights this class cannot reach (fp16 without ZeRO).
    """

    def __init__(self, engine: Any, masks: Mapping[str, torch.Tensor], optimizer: Any = None):
        engine = getattr(engine, "ds", engine)  # pipeline.engine.Engine wraps the DeepSpeedEngine as .ds
        self.engine = engine
        module = getattr(engine, "module", engine)
        self.optimizer = getattr(engine, "optimizer", None) if module is not engine else optimizer
        params = _named_params_all(module)
        problems = []
        by_param: dict[int, tuple[torch.nn.Parameter, torch.Tensor, str]] = {}
        for name, m in masks.items():
            p = params.get(name)
            if p is None:
                problems.append(f"mask '{name}' names no parameter of the model")
                continue
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(m.shape) != shape:
                problems.append(f"mask '{name}' has shape {tuple(m.shape)}, the weight {shape}")
                continue
            by_param[id(p)] = (p, m.to(torch.bool), name)  # tied weights: one entry per tensor
        if problems:
            raise ValueError("masks do not fit the model (wrong stage-03 output or model?):\n  - "
                             + "\n  - ".join(problems))
        # a DeepSpeed engine: is this DeepSpeed one whose fragments and partitions were verified?
        self.internals = not hasattr(engine, "zero_optimization_stage") or gate(
            "masks written into ZeRO's fp32 fragments", "deepspeed",
            "masks go through DeepSpeed's public safe_set_full_* and GatheredParameters (collectives)")
        self._entries: list[dict[str, Any]] = []
        for p, m, name in by_param.values():
            self._entries.append(self._plan(p, m, name))

    # how each parameter is reached ------------------------------------------------------------
    def _plan(self, p: torch.nn.Parameter, mask: torch.Tensor, name: str) -> dict[str, Any]:
        if not self.internals:
            zero3 = self.engine.zero_optimization_stage() == 3
            return {"kind": "public", "p": p, "name": name, "zero3": zero3,
                    "full": mask.to(p.ds_tensor.device if zero3 else p.device)}
        if hasattr(p, "ds_id"):  # ZeRO-3
            import torch.distributed as tdist

            n = p.ds_tensor.numel()
            group = getattr(p, "ds_process_group", None)
            r = tdist.get_rank(group=group) if tdist.is_initialized() else 0
            flat = mask.reshape(-1)
            local = torch.ones(n, dtype=torch.bool)  # padding beyond ds_numel: leave as is
            lo, hi = min(r * n, flat.numel()), min((r + 1) * n, flat.numel())
            local[: hi - lo] = flat[lo:hi]
            return {"kind": "zero3", "p": p, "name": name, "full": mask.to(p.ds_tensor.device),
                    "local": local.to(p.ds_tensor.device)}
        if getattr(p, "_hp_mapping", None) is not None or hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
            frag = None
            if p._hp_mapping is not None:
                a = p._hp_mapping.lp_fragment_address
                frag = mask.reshape(-1).narrow(0, a.start, a.numel)
                frag = frag.to(p._hp_mapping.get_hp_fragment().device)
            return {"kind": "fragment", "p": p, "name": name, "full": mask.to(p.device), "frag": frag}
        opt = self.optimizer
        if opt is not None and hasattr(opt, "fp32_groups_flat"):
            raise ValueError("fp16 without ZeRO keeps fp32 master weights that masks cannot reach; "
                             "use ZeRO stage 1, 2 or 3 (zero_optimization.stage) for a pruned student")
        return {"kind": "plain", "p": p, "name": name, "full": mask.to(p.device)}

    # the work, after each optimizer step ----------------------------------------------------
    @torch.no_grad()
    def apply(self, engine: Any = None) -> None:
        """Zero the pruned weights (masters, optimizer states, module weights); call after every step.

        Each rank zeroes its own share; every rank must call it (under ZeRO it is a per-rank operation
        on local data, no collective, but skipping it on one rank leaves that rank's share unmasked).
        :class:`pipeline.train.SparseTrainer` calls it in its ``after_step``.
        """
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        for e in self._entries:
            p, kind = e["p"], e["kind"]
            if kind == "zero3":
                keep = e["local"]
                if p.requires_grad and hasattr(p, "_z3_optimizer"):
                    v = safe_get_local_fp32_param(p)
                    safe_set_local_fp32_param(p, v.masked_fill(~keep.to(v.device), 0))
                    for key in self._z3_state_keys(p):
                        v = safe_get_local_optimizer_state(p, key)
                        safe_set_local_optimizer_state(p, v.masked_fill(~keep.to(v.device), 0), key)
                p.ds_tensor.data.masked_fill_(~keep, 0)
                if p.data.numel() == p.ds_numel:  # gathered (persistent or currently in use)
                    p.data.masked_fill_(~e["full"].view_as(p.data), 0)
            elif kind == "fragment":
                hm = p._hp_mapping
                if hm is not None and e["frag"] is not None:
                    keep = e["frag"]
                    hm.get_hp_fragment().data.masked_fill_(~keep, 0)
                    if hm.optim_fragment:
                        for key in hm.get_optim_state_keys():
                            hm.get_hp_fragment(key).data.masked_fill_(~keep, 0)
                p.data.masked_fill_(~e["full"], 0)
            elif kind == "public":
                self._apply_public(e)
            else:
                p.data.masked_fill_(~e["full"], 0)
                st = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
                for v in st.values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.masked_fill_(~e["full"], 0)

    __call__ = apply

    def _apply_public(self, e: dict[str, Any]) -> None:
        """One parameter through DeepSpeed's public API only (every rank: each call is a collective under ZeRO)."""
        import deepspeed
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        p, full = e["p"], e["full"]
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        if master is not None:  # an optimizer with fp32 masters (ZeRO, DeepSpeed's bf16 optimizer)
            safe_set_full_fp32_param(p, master.masked_fill(~full.to(master.device), 0))
            # Adam(W)'s moments (the only optimizer the pipeline builds), once the first step has made them
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            for key in ("exp_avg", "exp_avg_sq") if getattr(inner, "state", None) else ():
                v = safe_get_full_optimizer_state(p, key)
                if v is not None:
                    safe_set_full_optimizer_state(p, v.masked_fill(~full.to(v.device), 0), key)
        if e["zero3"]:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # every rank; rank 0's values kept
                p.data.masked_fill_(~full.view_as(p.data), 0)
            return
        p.data.masked_fill_(~full, 0)
        if master is None and self.optimizer is not None:  # fp32 without ZeRO: the torch optimizer's own state
            for v in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.masked_fill_(~full, 0)

    @staticmethod
    def _z3_state_keys(p: torch.nn.Parameter) -> list[str]:
        """Optimizer state keys of the parameter's fp32 partition that have its shape (Adam: exp_avg, exp_avg_sq)."""
        opt = p._z3_optimizer
        flat = opt.fp32_partitioned_groups_flat[opt.grad_position[opt.get_param_id(p)][0]]
        state = opt.optimizer.state.get(flat, {})
        return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]

    def names(self) -> list[str]:
        """Names of the masked parameters (one per tensor; tied weights once)."""
        return [e["name"] for e in self._entries]


def param_bytes(module: torch.nn.Module, local: bool) -> int:
    """Bytes of a module's parameters: all of them (``local=False``), or what this rank holds now: under
    ZeRO-3 its partitions (``ds_tensor``) plus any parameter currently gathered (persistent small ones).
    Reads DeepSpeed's ``ds_tensor``/``ds_numel`` where a parameter has them (read only; without them every
    parameter counts whole)."""
    total = 0
    for p in module.parameters():
        if not hasattr(p, "ds_tensor"):
            total += p.numel() * p.element_size()
        elif not local:
            total += p.ds_numel * p.ds_tensor.element_size()
        else:
            total += p.ds_tensor.numel() * p.ds_tensor.element_size() + p.data.numel() * p.data.element_size()
    return total
