"""A ZeRO-1/2 fp16 optimizer step with no host synchronisation: the host reads the overflow flag one step later.

DeepSpeed 0.19.8's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) makes the host wait for the GPU twice per fp16
step: its backward ends with a device-wide ``synchronize()`` (``independent_gradient_partition_epilogue`` with
``overlap_comm``), and ``step()`` reads the overflow flag (``has_overflow``: ``overflow_gpu[0].item()``) before it
decides whether to launch the update.  Each empties the GPU's queue, so the GPU then idles while the host runs the
optimizer step's Python and the next forward's, and ZeRO-2 fp16 stayed slower a step than a plain PyTorch loop
(bf16 autocast, fused AdamW, ``clip_grad_norm_``), which never waits (figures: ``results/bench/NOTES.md``, the
2026-12-02 third session).

:func:`install` gives the optimizer the same arithmetic and the same decisions, and only moves the moment the host
learns of an overflow, the way PyTorch's ``torch.amp.GradScaler`` does with fused optimizers
(``torch/amp/grad_scaler.py``: ``found_inf`` and ``grad_scale`` handed to the fused kernel):

- overflow and gradient norm come from one multi-tensor norm and one all-reduce: the step overflowed exactly when
  the global sum of squares is not finite (every fp16 gradient is at most 65504 in magnitude, so finite ones cannot
  overflow an fp32 sum: see :func:`pipeline.compat.zero_checks.use_foreach_grad_checks`);
- the AdamW update is launched at once through PyTorch's fused kernel (``torch._fused_adamw_``, or
  ``torch._fused_adam_`` for L2 weight decay) with ``found_inf`` = the overflow flag (the kernel then leaves weights
  and moments untouched) and ``grad_scale`` = DeepSpeed's combined unscale-and-clip factor
  (``unscale_and_clip_grads``: loss scale times ``max(1, norm / clip)``), which the kernel divides the gradients by;
  the fp16 weights are then refreshed from the fp32 master weights as DeepSpeed does;
- the flag is copied to page-locked host memory behind an event and read when the host next needs it: before the
  next backward scales its loss (``scale_if_loss``), or when :class:`pipeline.engine.Engine` is asked for the loss
  scale, skip count, learning rate or step outcome, or saves a checkpoint.  By then the GPU is normally past that
  point, and the read does not wait;
- on that read DeepSpeed's bookkeeping happens as it would have, in the same order: the loss scaler's update
  (``update_scale``: back-off, hysteresis, growth), the engine's ``skipped_steps`` and ``was_step_applied``, the LR
  schedule's step (held back until then, so a skipped step leaves it where it was), and the optimizer's step count.

The update is the same AdamW: PyTorch's fused kernel in place of DeepSpeed's ``multi_tensor_adam`` (both fp32, the
same bias correction, decoupled weight decay and epsilon placement).  Optimizer state keeps the inner optimizer's
layout (DeepSpeed ``FusedAdam``: ``exp_avg``, ``exp_avg_sq`` and an integer ``step``; ``torch.optim.AdamW``: the
same with a tensor ``step``), so checkpoints load with or without this step.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.compat import gate
from pipeline.compat.zero_checks import squared_norm_sum

#: the engine attribute that holds the installed step (install is idempotent)
_ATTR = "_pipeline_deferred_overflow"


def why_not(ds_engine: Any) -> str | None:
    """Why :func:`install` would leave ``ds_engine`` alone (``None``: it would install).

    Supported: DeepSpeed's ZeRO stage 1 or 2 optimizer (``DeepSpeedZeroOptimizer``) in fp16 with DeepSpeed's loss
    scaler, no CPU/NVMe offload, no MoE, model, pipeline or AutoEP parallelism, no ZenFlow or Muon, no DeepSpeed
    monitor (it reads the loss scale inside ``step()``), and an inner optimizer that is DeepSpeed's ``FusedAdam``
    (bias-corrected) or ``torch.optim.Adam``/``AdamW`` without amsgrad or maximize."""
    try:
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError as e:
        return f"DeepSpeed's ZeRO-1/2 optimizer or FusedAdam cannot be imported ({e})"
    opt = getattr(ds_engine, "optimizer", None)
    if type(opt) is not DeepSpeedZeroOptimizer:
        return f"the optimizer is {type(opt).__name__}, not ZeRO stage 1/2's DeepSpeedZeroOptimizer"
    if getattr(opt, "dtype", None) != torch.float16 or not getattr(opt, "check_grad_overflow", False):
        return "not fp16 with overflow checks"
    needed = ("averaged_gradients", "bit16_groups", "params_in_partition", "params_not_in_partition",
              "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "bit16_groups_flat",
              "real_dp_process_group", "dp_process_group", "partition_size", "nccl_start_alignment_factor",
              "allgather_bucket_size", "clip_grad", "loss_scaler", "free_grad_in_param_list", "flatten",
              "flatten_dense_tensors_aligned", "_get_preflattened_grad_partition", "_release_preflattened_grad_buffers",
              "_update_model_bit16_weights", "_lazy_init_hp_params_optimizer_state", "_update_scale",
              "independent_gradient_partition_epilogue", "scale_if_loss", "all_grad_tensors", "overlap_comm")
    missing = [n for n in needed if not hasattr(opt, n)]
    if missing:
        return f"this DeepSpeed version's ZeRO optimizer lacks {', '.join(missing)}"
    for flag, what in (("cpu_offload", "optimizer offload"), ("has_moe_layers", "MoE layers"),
                       ("zenflow", "ZenFlow"), ("custom_loss_scaler", "a custom loss scaler"),
                       ("torch_autocast_gradscaler", "torch autocast's GradScaler")):
        if getattr(opt, flag, False):
            return f"{what} in use"
    if getattr(opt, "model_parallel_world_size", 1) != 1 or getattr(opt, "mpu", None) is not None:
        return "model parallelism in use"
    if getattr(opt, "autoep_folding_tp_group", None) is not None:
        return "AutoEP folding in use"
    if getattr(ds_engine, "pipeline_parallelism", False):
        return "pipeline parallelism in use"
    monitor = getattr(ds_engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        return "DeepSpeed's monitor is on (it reads the loss scale inside step())"
    inner = opt.optimizer
    groups = inner.param_groups
    if isinstance(inner, FusedAdam):
        if not all(g.get("bias_correction", True) for g in groups):
            return "FusedAdam without bias correction"
    elif isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        if any(g.get("amsgrad") or g.get("maximize") or torch.is_tensor(g.get("lr")) for g in groups):
            return "torch Adam with amsgrad, maximize or a tensor learning rate"
    else:
        return f"the inner optimizer is {type(inner).__name__}, not FusedAdam or torch Adam/AdamW"
    if any(len(g["params"]) != 1 for g in groups) or len(groups) != len(opt.bit16_groups):
        return "the inner optimizer's groups are not one flat fp32 partition each"
    return None


def install(ds_engine: Any, result_type: type) -> DeferredOverflowStep | None:
    """Give ``ds_engine``'s ZeRO-1/2 fp16 optimizer the deferred-overflow step (every rank must call this, before
    the first step); returns it, or ``None`` (and changes nothing) where :func:`why_not` gives a reason or the
    installed DeepSpeed is outside :data:`pipeline.compat.VERIFIED` (then DeepSpeed's own step runs and one line
    says so).  ``result_type`` is the step-outcome class the engine hands out (:class:`pipeline.engine.StepResult`:
    built with ``applied``, ``loss_scale`` and ``grad_norm``; ``reader`` and ``settled`` set on it)."""
    if why_not(ds_engine) is not None:
        return None
    if not gate("deferred fp16 overflow step", "deepspeed", "DeepSpeed's own ZeRO-1/2 fp16 step runs"):
        return None
    step = getattr(ds_engine, _ATTR, None)
    if step is None:
        step = DeferredOverflowStep(ds_engine, result_type)
        setattr(ds_engine, _ATTR, step)
    return step


class _HeldScheduler:
    """The engine's LR scheduler with ``step()`` held until the optimizer step's outcome is known.

    DeepSpeed's engine steps the schedule right after ``optimizer.step()`` unless the step overflowed
    (``DeepSpeedEngine._take_model_step``); here the call is kept and made by :meth:`release` once the overflow
    flag has been read, and dropped for a skipped step.  Everything else (``state_dict``, ``get_last_lr``, ...) is
    the wrapped scheduler's."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.held: list[tuple[tuple, dict]] = []

    def step(self, *args, **kwargs) -> None:
        self.held.append((args, kwargs))

    def release(self, applied: bool) -> None:
        held, self.held = self.held, []
        if applied:
            for args, kwargs in held:
                self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class _Pending:
    """One launched step whose overflow flag the host has not read yet."""

    def __init__(self, on_applied: list, result: Any):
        self.on_applied = on_applied  # host step counters to advance if the step was applied
        self.result = result        # the StepResult to settle


class DeferredOverflowStep:
    """The step :func:`install` puts on a ZeRO-1/2 fp16 optimizer (see the module docstring).

    Attributes: ``ds`` (the ``DeepSpeedEngine``), ``opt`` (its ``DeepSpeedZeroOptimizer``), ``result`` (the
    :class:`pipeline.engine.StepResult` of the latest step: ``applied`` and ``loss_scale`` are filled in when the
    flag is read), ``host_reads`` (flags read so far) and ``waits`` (reads that found the flag not yet copied, so
    the host waited for the GPU: in the training loop that happens when the host is more than a forward pass ahead,
    and the GPU still has that forward queued, so it does not idle)."""

    def __init__(self, ds_engine: Any, result_type: type):
        from deepspeed.ops.adam import FusedAdam

        self._step_result = result_type
        self.ds = ds_engine
        self.opt = opt = ds_engine.optimizer
        inner = opt.optimizer
        self.ds_fused = isinstance(inner, FusedAdam)
        self.decoupled = bool(inner.adam_w_mode) if self.ds_fused else (
            isinstance(inner, torch.optim.AdamW) or any(g.get("decoupled_weight_decay") for g in inner.param_groups))
        self.device = opt.single_partition_of_fp32_groups[0].device
        cuda = self.device.type == "cuda"
        # the pending step's overflow flag (1.0: overflow), page-locked so its copy does not stop the host, and
        # the event recorded after that copy (none off CUDA, where the copy is synchronous)
        self._flag_host = torch.zeros(1, dtype=torch.float32, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self.pending: _Pending | None = None
        self.result = None
        self.host_reads = 0
        self.waits = 0
        self.reader = self.resolve  # what a StepResult calls to read its outcome (the Engine puts its settle here)
        self._device_steps: dict[int, tuple[int, torch.Tensor]] = {}  # id(param) -> (host count, device count)
        if ds_engine.lr_scheduler is not None and not isinstance(ds_engine.lr_scheduler, _HeldScheduler):
            ds_engine.lr_scheduler = _HeldScheduler(ds_engine.lr_scheduler)
        scale_if_loss = opt.scale_if_loss

        def scale_if_loss_after_reading(value):
            self.resolve()  # the loss scale of this backward depends on the last step's outcome
            return scale_if_loss(value)

        opt.scale_if_loss = scale_if_loss_after_reading
        opt.step = self.step
        if opt.overlap_comm and getattr(opt, "reduction_stream", None) is not None:
            opt.independent_gradient_partition_epilogue = self._epilogue_without_host_sync(
                opt.independent_gradient_partition_epilogue)

    # -- the backward's end ------------------------------------------------------------------------
    def _epilogue_without_host_sync(self, epilogue):
        """DeepSpeed's gradient epilogue with its device-wide ``synchronize()`` turned into a stream wait.

        With ``overlap_comm`` the epilogue's last reductions and copies into the gradient partition run on the
        optimizer's ``reduction_stream``; DeepSpeed then calls ``get_accelerator().synchronize()`` before anything
        reads them.  Making the current stream wait for the reduction stream orders every later read (and every
        reuse of the buckets' memory, which the caching allocator hands out on the current stream) the same way,
        without stopping the host."""
        from deepspeed.accelerator import get_accelerator

        acc, opt = get_accelerator(), self.opt

        def wait_for_reductions(*_args, **_kwargs):
            acc.current_stream().wait_stream(opt.reduction_stream)

        def run():
            had_own = "synchronize" in vars(acc)
            saved = acc.synchronize
            acc.synchronize = wait_for_reductions
            try:
                return epilogue()
            finally:
                if had_own:
                    acc.synchronize = saved
                else:
                    del acc.synchronize

        return run

    # -- the step ----------------------------------------------------------------------------------
    def _device_step(self, p: torch.Tensor, state: dict, on_applied: list) -> torch.Tensor:
        """The step count the fused kernel reads for ``p``: ``state['step']`` itself when it is a tensor on
        ``p``'s device, else a device copy of the host count (remade when the host count changed: a checkpoint
        load); the host count is advanced by :meth:`resolve` when the step was applied."""
        step = state["step"]
        if torch.is_tensor(step) and step.device == p.device:
            return step
        host = int(step)
        kept = self._device_steps.get(id(p))
        if kept is None or kept[0] != host:
            kept = (host, torch.full((), float(host), dtype=torch.float32, device=p.device))  # a fill, not a copy
            self._device_steps[id(p)] = kept
        on_applied.append((state, id(p)))
        return kept[1]

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Empty optimizer state for ``p`` in the inner optimizer's own layout."""
        if self.ds_fused:
            state["step"] = group.get("step", 0)  # as FusedAdam.step
        else:
            on_device = group.get("fused") or group.get("capturable")
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _adam(self, i: int, grad_scale: torch.Tensor, found_inf: torch.Tensor, on_applied: list) -> None:
        """AdamW on the inner optimizer's group ``i`` (one flat fp32 partition), skipped on the device when
        ``found_inf`` is 1; gradients are divided by ``grad_scale`` inside the kernel."""
        inner = self.opt.optimizer
        group = inner.param_groups[i]
        p = group["params"][0]
        if p.grad is None:
            return
        state = inner.state[p]
        if len(state) == 0:
            self._init_state(p, group, state)
        step = self._device_step(p, state, on_applied)
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        step.add_(1)
        kernel([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step], lr=float(group["lr"]),
               beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
               maximize=False, grad_scale=grad_scale, found_inf=found_inf)
        step.sub_(found_inf[0])  # a skipped step does not count (as torch.optim's fused path)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """``DeepSpeedZeroOptimizer.step`` for fp16 without offload, launched without reading the overflow flag.

        DeepSpeed's non-overflow path, in the same order (``stage_1_and_2.py``): gradients of other partitions
        freed; this rank's partition flattened and cast to fp32; unscaled and clipped (here inside the AdamW
        kernel); AdamW; fp16 weights refreshed from fp32 and all-gathered; parameter views re-pointed.  On
        overflow the kernel changes nothing, so the weights the all-gather spreads are the old ones, as after
        DeepSpeed's early return.  Every rank must call this (two collectives)."""
        from deepspeed import comm as dist
        from deepspeed.runtime.utils import all_gather_dp_groups
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        self.resolve()  # normally done already, before this step's backward
        opt = self.opt
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        n_groups = len(opt.bit16_groups)
        sq = squared_norm_sum([g for i in range(n_groups) for g in (opt.averaged_gradients[i] or [])], self.device)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=opt.dp_process_group)  # every rank
        found_inf = (~torch.isfinite(sq)).float().view(1)
        norm = sq.sqrt()  # of the scaled gradients
        prev_scale = float(opt.loss_scale)
        if opt.clip_grad > 0:  # DeepSpeed's unscale_and_clip_grads
            clip = torch.clamp(((norm / prev_scale) + 1e-6) / opt.clip_grad, min=1.0)
            grad_scale = (clip * prev_scale).view(1)
        else:
            grad_scale = torch.full((1,), prev_scale, dtype=torch.float32, device=self.device)
        # DeepSpeed reports inf as the norm of a skipped step
        global_norm = torch.where(found_inf[0] > 0, float("inf"), norm / prev_scale)
        opt._global_grad_norm = global_norm if getattr(opt, "compute_grad_norm", True) else None
        on_applied: list = []
        for i in range(n_groups):
            group_pg = opt.real_dp_process_group[i]
            partition_id = dist.get_rank(group=group_pg)
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])
            flat = opt._get_preflattened_grad_partition(i)
            if flat is None:
                if partition_id == dist.get_world_size(group=group_pg) - 1:
                    flat = opt.flatten_dense_tensors_aligned(opt.averaged_gradients[i], int(opt.partition_size[i]))
                else:
                    flat = opt.flatten(opt.averaged_gradients[i])
            fp32 = opt.single_partition_of_fp32_groups[i]
            fp32.grad = flat.to(fp32.dtype)
            del flat
            opt.free_grad_in_param_list(opt.params_in_partition[i])
            opt._release_preflattened_grad_buffers(i)
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
            self._adam(i, grad_scale, found_inf, on_applied)
            fp32.grad = None
            opt.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32.data)
        all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,  # every rank
                             partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                             dp_process_group=opt.real_dp_process_group,
                             start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)
        for i in range(n_groups):
            opt._update_model_bit16_weights(i)
        opt._lazy_init_hp_params_optimizer_state()
        # the inner optimizer's step() is not called: mark it as torch's LR-scheduler wrapper of that step does
        # (torch.optim.lr_scheduler: the schedule's step() warns when the optimizer's has not run)
        opt.optimizer._opt_called = True
        opt.overflow = False  # provisional: the engine's _take_model_step reads it now; resolve() sets the truth
        # one buffer and one event serve every step: resolve() at the top of this method read the last flag
        self._flag_host.copy_(found_inf, non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
        self.result = self._step_result(grad_norm_value=opt._global_grad_norm, settle=self.reader)
        self.pending = _Pending(on_applied, self.result)

    # -- reading the outcome -----------------------------------------------------------------------
    def resolve(self) -> None:
        """Read the last step's overflow flag (waiting for the GPU only if it has not copied it yet) and do
        DeepSpeed's bookkeeping for it: loss-scale update, skipped-step count, ``was_step_applied``, the held LR
        schedule step, the optimizer's step count; then settle the step's :class:`~pipeline.engine.StepResult`.
        A no-op when nothing is pending.

        Raises:
            Exception: DeepSpeed's own, when the loss scale is already at its minimum and the step overflowed
                (:class:`pipeline.engine.Engine` turns it into ``FP16HealthError``).
        """
        p = self.pending
        if p is None:
            return
        self.pending = None
        if self._event is not None:
            if not self._event.query():
                self.waits += 1
            self._event.synchronize()
        self.host_reads += 1
        overflow = bool(self._flag_host[0] != 0)
        opt, ds = self.opt, self.ds
        opt.overflow = overflow
        ds._step_applied = not overflow
        if overflow:
            ds.skipped_steps += 1
        else:
            for state, key in p.on_applied:
                state["step"] += 1
                host, dev = self._device_steps[key]
                self._device_steps[key] = (host + 1, dev)
        if isinstance(ds.lr_scheduler, _HeldScheduler):
            ds.lr_scheduler.release(not overflow)
        try:
            opt._update_scale(overflow)  # raises at the minimum loss scale (DeepSpeed's message)
        finally:
            p.result.settle(not overflow, float(opt.loss_scale))
