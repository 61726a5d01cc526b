"""Multi-tensor overflow and gradient-norm checks in DeepSpeed 0.19's ZeRO optimizers (instance methods and the
``is_invalid_grad_norm``/``combine_grad_norm_groups`` globals of ``deepspeed.runtime.zero.stage_1_and_2`` and
``.stage3`` replaced); gated on :data:`pipeline.compat.VERIFIED` ``deepspeed``."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.compat import gate


def squared_norm_sum(gradients: list, device: Any) -> torch.Tensor:
    """Sum over ``gradients`` of each tensor's squared L2 norm: a 0-d fp32 tensor on the device, computed with
    multi-tensor kernels (``torch._foreach_norm`` with fp32 accumulation).  ``None`` entries, empty tensors and
    ZeRO's alignment padding (``_zero_padding``) are left out; with nothing left the sum is 0 on ``device``.
    No host synchronisation.  It is not finite exactly when some fp16 gradient is inf/NaN (see
    :func:`use_foreach_grad_checks`)."""
    grads = [g for g in gradients if g is not None and not getattr(g, "_zero_padding", False) and g.numel() > 0]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


#: attribute set on a gradient-norm tensor known to be finite and non-negative (see use_foreach_grad_checks)
_KNOWN_VALID = "_pipeline_norm_known_valid"


def _install_known_valid_norms() -> None:
    """Wrap ``is_invalid_grad_norm`` and ``combine_grad_norm_groups`` as DeepSpeed's ZeRO modules see them
    (``deepspeed.runtime.zero.stage_1_and_2`` and ``.stage3``; idempotent).

    ``combine_grad_norm_groups`` marks its result known-valid when every group norm it combines is;
    ``is_invalid_grad_norm`` returns False for a known-valid tensor without reading it (DeepSpeed's reads
    the device: a host synchronisation) and defers to DeepSpeed's for everything else, so unmarked norms
    behave exactly as before."""
    import deepspeed.runtime.zero.stage3 as z3
    import deepspeed.runtime.zero.stage_1_and_2 as z12

    for mod in (z12, z3):
        if getattr(mod.is_invalid_grad_norm, "_pipeline_wrapped", False):
            continue
        ds_invalid, ds_combine = mod.is_invalid_grad_norm, mod.combine_grad_norm_groups

        def is_invalid_grad_norm(norm, _ds=ds_invalid):
            if torch.is_tensor(norm) and getattr(norm, _KNOWN_VALID, False):
                return False
            return _ds(norm)

        def combine_grad_norm_groups(norm_groups, *args, _ds=ds_combine, **kwargs):
            norm_groups = list(norm_groups)
            out = _ds(norm_groups, *args, **kwargs)
            if norm_groups and all(torch.is_tensor(n) and getattr(n, _KNOWN_VALID, False) for n in norm_groups):
                setattr(out, _KNOWN_VALID, True)
            return out

        is_invalid_grad_norm._pipeline_wrapped = True
        mod.is_invalid_grad_norm, mod.combine_grad_norm_groups = is_invalid_grad_norm, combine_grad_norm_groups


def use_foreach_grad_checks(optimizer: Any) -> bool:
    """Replace the per-tensor overflow and gradient-norm loops of DeepSpeed's ZeRO optimizers by
    multi-tensor (``torch._foreach_norm``) forms; returns True when it did.

    DeepSpeed 0.19.8's ZeRO-1/2 ``DeepSpeedZeroOptimizer`` checks each gradient of the rank's partition for
    inf/NaN with two reductions per tensor (``has_overflow_partitioned_grads_serial``), and both it and the
    ZeRO-3 ``DeepSpeedZeroOptimizer_Stage3`` compute the global norm with a cast and a norm per tensor
    (``get_grad_norm_direct``): several hundred small kernels per step for a 12-layer model, launched after
    a host synchronisation (the overflow flag's ``.item()``), so the GPU idles while the host launches them.
    The replacement computes every tensor's L2 norm (fp32 accumulation) in a few multi-tensor kernels:

    - overflow (ZeRO-1/2; ZeRO-3 already checks its flat gradient buffer at once): a gradient holds inf/NaN
      exactly when its norm is not finite (fp16 gradients are at most 65504 in magnitude, so the fp32 sum of
      squares of even 10^9 of them stays below 5e18, far from the fp32 limit of 3.4e38);
    - norm: ``sqrt(sum_i ||g_i||^2)`` summed over the partition's process group, with the same invalid-norm
      sentinel (-1 for inf/NaN) DeepSpeed uses, so clipping and skipping behave as before; the sentinel is
      written with a scalar ``masked_fill_`` (DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` copies a
      host tensor to the device and reads a device scalar back: two host synchronisations per group);
    - validity: DeepSpeed then asks ``is_invalid_grad_norm`` of the combined norm (a host synchronisation
      each time: three per ZeRO-1/2 step, one per ZeRO-3 step).  When the fp16 overflow check of the same
      step has just passed, every gradient is finite, so the fp32 norm above is finite and non-negative and
      the answer is known: such norms are marked, and :func:`_install_known_valid_norms` answers for them
      without reading the device.  Every other norm (bf16, whose finite values can still overflow an fp32
      sum of squares; no overflow check; DeepSpeed's own loops) still gets DeepSpeed's check.

    Left alone (returns False) for anything else: other optimizer classes (no ZeRO, BF16_Optimizer), CPU or
    NVMe offload, MoE or AutoEP layers, model or pipeline parallelism, or a DeepSpeed version without these
    methods.  On a DeepSpeed version outside :data:`pipeline.compat.VERIFIED` nothing is replaced and one line
    says so.  Non-L2 norms and ZeRO-3 AutoEP expert groups fall back to DeepSpeed's own method at call time.

    One difference from DeepSpeed remains: its norm accumulates in fp64, this one in fp32.  For fp16 that
    changes nothing (see above); in bf16 a finite gradient above about 1.8e19 would make this norm overflow
    and the step be skipped, where DeepSpeed would clip it.
    """
    if not gate("multi-tensor overflow/norm checks", "deepspeed", "DeepSpeed's per-tensor loops run"):
        return False
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    stage3 = type(optimizer) is DeepSpeedZeroOptimizer_Stage3
    if not (stage3 or type(optimizer) is DeepSpeedZeroOptimizer):
        return False
    needed = ("get_grad_norm_direct", "averaged_gradients", "dp_process_group", "overflow") + (
        ("_get_param_partition_group", "dtype") if stage3 else
        ("has_overflow_partitioned_grads_serial", "bit16_groups", "check_grad_overflow", "dtype"))
    if not all(hasattr(optimizer, n) for n in needed):
        return False
    offload = getattr(optimizer, "offload_optimizer" if stage3 else "cpu_offload", False)
    if offload or getattr(optimizer, "offload_param", False) or getattr(optimizer, "has_moe_layers", False):
        return False
    if getattr(optimizer, "model_parallel_world_size", 1) != 1 or getattr(optimizer, "mpu", None) is not None:
        return False
    if stage3 and (getattr(optimizer, "model_parallel_group", None) is not None
                   or getattr(optimizer, "autoep_folding_tp_group", None) is not None):
        return False
    from deepspeed import comm as ds_comm

    _install_known_valid_norms()
    own_norm = type(optimizer).get_grad_norm_direct

    def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
        # one fp32 L2 norm per tensor, in multi-tensor kernels
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))

    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in (optimizer.averaged_gradients[i] or [])
                 if g is not None and g.numel() > 0]
        if not grads:
            return torch.zeros(1, dtype=torch.bool, device=optimizer.device)
        return (~torch.isfinite(_norms(grads))).any().view(1)

    def get_grad_norm_direct(gradients, params, norm_type=2) -> torch.Tensor:
        if float(norm_type) != 2.0:
            return own_norm(optimizer, gradients, params, norm_type)
        group = optimizer.dp_process_group
        if stage3 and params:
            group = optimizer._get_param_partition_group(params[0])
            autoep = getattr(optimizer, "_autoep_expert_parallel_group", None)
            if any(optimizer._get_param_partition_group(p) != group for p in params) or (
                    autoep is not None and autoep(params) is not None):
                # mixed groups (DeepSpeed raises) or AutoEP experts (one more all-reduce): DeepSpeed's own
                return own_norm(optimizer, gradients, params, norm_type)
        total = squared_norm_sum(gradients, optimizer.device)
        ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=group)  # every rank
        total = total.sqrt()
        total.masked_fill_(~torch.isfinite(total), -1.0)  # DeepSpeed's invalid-norm sentinel, on the device
        # fp16 checks overflow before the norm and computes the norm only when there was none: every gradient
        # is finite, hence at most 65504 in magnitude, so this fp32 norm is finite (not so for bf16, whose
        # finite values reach 3e38: their squares overflow fp32)
        overflow_checked = optimizer.dtype == torch.float16 and (stage3 or optimizer.check_grad_overflow)
        if overflow_checked and not optimizer.overflow:
            setattr(total, _KNOWN_VALID, True)
        return total

    if not stage3:
        optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True
