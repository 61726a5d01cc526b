"""One small training-engine interface over two ways of building a DeepSpeed engine.

- **DeepSpeed** (``deepspeed --num_gpus N``, ``deepspeed --hostfile``, and plain ``python``):
  ``deepspeed.initialize`` with the resolved DeepSpeed config.  Under plain ``python`` a one-process
  group is made first (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set to a
  single local rank on a free port).
- **Accelerate** (``accelerate launch --config_file ds_configs/accelerate/<file>.yaml``):
  ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=<the same resolved dict>))`` and
  ``accelerator.prepare``, which calls ``deepspeed.initialize`` itself.

Both give a ``DeepSpeedEngine``; everything after that (backward, step, loss scale, skipped steps,
gradient norm, checkpoints, export) goes through :class:`Engine`, so the training loop has one path.
The LR schedule is handed to DeepSpeed (``lr_scheduler=``), which steps it only when an optimizer step
was applied: an fp16 overflow skips the step and leaves the schedule where it was.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import dist

LAUNCHER_ENV = dist.LAUNCHER_ENV


class FP16HealthError(RuntimeError):
    """fp16 training cannot continue: the loss scale hit its minimum or too many steps overflowed."""


def detect_launcher() -> str:
    """``deepspeed``, ``accelerate``, ``torchrun`` or ``python``; remembered in ``$PIPELINE_LAUNCHER``.

    The first call decides (before :func:`init_distributed` sets rank variables for plain ``python``).
    """
    name = dist.launcher()
    dist.record_launcher(name)
    return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> str:
    """Start the process group (every rank must call this); returns the launcher's name.

    Under plain ``python`` the variables of a single local rank are set first, on a free port, so
    DeepSpeed neither waits for other ranks nor tries MPI discovery.  Under ``accelerate launch``
    nothing is done here: ``Accelerator`` makes the group.
    """
    launcher = detect_launcher()
    if launcher == "accelerate":
        return launcher
    if launcher == "python":
        # a one-rank group of our own: always a fresh port (a MASTER_PORT inherited from a parent may be taken)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    import deepspeed

    from pipeline.preflight import check_build_tools

    check_build_tools(device_type())  # before DeepSpeed would start building its op without a compiler
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    return launcher


def sanitize_cuda_arch_list() -> str | None:
    """Drop arch-specific suffixes (``9.0a`` -> ``9.0``) from ``$TORCH_CUDA_ARCH_LIST``; returns a message if changed.

    DeepSpeed 0.19.8's JIT op builder (``CUDAOpBuilder.compute_capability_args``) parses each entry's minor
    version with ``int()`` and fails on ``'0a'`` ("invalid literal for int() with base 10: '0a'"), so FusedAdam
    cannot be built on images that export ``TORCH_CUDA_ARCH_LIST=9.0a`` (seen on the H200 image).
    """
    import re

    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    fixed = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)
    if fixed == value:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return (f"TORCH_CUDA_ARCH_LIST={value!r} set to {fixed!r}: DeepSpeed's JIT op builder cannot parse "
            f"arch suffixes such as '9.0a'")


def device_type() -> str:
    """DeepSpeed's accelerator name: ``cuda``, ``cpu``, ... (``DS_ACCELERATOR`` picks it)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (ndim >= 2, embeddings included), none on norms and biases.

    As nanoGPT's ``configure_optimizers``; tied tensors appear once.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class StepResult:
    """What one optimizer step did (read on every rank; identical on all).

    ``applied`` (False: skipped because of an fp16 overflow) and ``loss_scale`` (the loss scale after the step;
    1.0 without fp16) are host values.  With the deferred overflow check (:mod:`pipeline.fp16_step`) they are
    known only once the host has read the step's overflow flag, which it does before the next backward; reading
    them earlier reads the flag then (waiting for the GPU to reach it).  The gradient norm stays on the device
    until :attr:`grad_norm` is read: that waits for the optimizer step's kernels (a host synchronisation), so the
    training loop reads it only on the steps it logs.
    """

    def __init__(self, applied: bool | None = None, loss_scale: float | None = None, grad_norm_value: Any = None,
                 settle: Callable[[], None] | None = None):
        self._applied, self._loss_scale = applied, loss_scale
        self.grad_norm_value = grad_norm_value  # DeepSpeed's global norm: a 0-d tensor, a float, or None
        self._settle = settle  # reads the outcome when it is asked for before it is known

    def settle(self, applied: bool, loss_scale: float) -> None:
        """Record the outcome (called by whoever read the overflow flag)."""
        self._applied, self._loss_scale, self._settle = bool(applied), float(loss_scale), None

    @property
    def known(self) -> bool:
        """True when ``applied`` and ``loss_scale`` can be read without waiting for the GPU."""
        return self._applied is not None

    @property
    def applied(self) -> bool:
        if self._applied is None:
            self._settle()
        return self._applied

    @property
    def loss_scale(self) -> float:
        if self._loss_scale is None:
            self._settle()
        return self._loss_scale

    @property
    def grad_norm(self) -> float | None:
        """Global L2 norm of the gradients before clipping (None when DeepSpeed did not compute one; inf for a
        skipped step)."""
        g = self.grad_norm_value
        if g is None:
            return None
        return float(g.item() if torch.is_tensor(g) else g)


class Engine:
    """A ``DeepSpeedEngine`` and what the training loop needs from it.

    Build it with :func:`build_engine`.  Attributes: ``ds`` (the ``DeepSpeedEngine``), ``module`` (the
    wrapped ``transformers`` model; under ZeRO-3 its parameters are partitioned), ``device``,
    ``precision`` (``fp16``/``bf16``/``fp32``), ``zero_stage``, ``backend`` (``deepspeed``/``accelerate``),
    ``launcher``, ``rank``, ``world_size``, ``config`` (the resolved DeepSpeed dict), ``accelerator``.
    """

    def __init__(self, ds: Any, config: dict, precision: str, backend: str, launcher: str,
                 accelerator: Any = None):
        self.ds = ds
        self.module = ds.module
        self.config = config
        self.precision = precision
        self.backend = backend
        self.launcher = launcher
        self.accelerator = accelerator
        self.device = ds.device
        self.zero_stage = int(ds.zero_optimization_stage())
        self.rank = ds.global_rank
        self.world_size = ds.world_size
        fp16 = config.get("fp16", {})
        self.min_loss_scale = float(fp16.get("min_loss_scale", 1.0)) if precision == "fp16" else None
        self.compiled = False  # set by compile(); the loss functions read it
        self.foreach_checks = False  # set by build_engine (use_foreach_grad_checks)
        self.deferred = None  # set by build_engine: the pipeline.fp16_step.DeferredOverflowStep, if installed

    # -- compilation -----------------------------------------------------------------------------
    def compile(self) -> None:
        """``torch.compile`` the model in place (``DeepSpeedEngine.compile``: ``nn.Module.compile`` on the
        wrapped module, inductor backend) and mark the engine so the training losses use their compiled,
        fused forms (see :func:`pipeline.train.token_cross_entropy`).  Every rank must call this."""
        self.ds.compile()
        self.compiled = True

    @contextlib.contextmanager
    def uncompiled(self):
        """Run the block with the model's eager forward (evaluation, text samples): their shapes change
        (last partial batch, growing sequences), and compiling each shape would cost more than it saves."""
        mod = self.module
        saved = getattr(mod, "_compiled_call_impl", None)
        mod._compiled_call_impl = None
        try:
            yield
        finally:
            mod._compiled_call_impl = saved

    # -- forward / backward / step -------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    @contextlib.contextmanager
    def _fp16_health(self):
        """DeepSpeed's bare Exception at the minimum loss scale, as :class:`FP16HealthError`."""
        try:
            yield
        except Exception as e:
            if "loss scale already at minimum" in str(e):
                raise FP16HealthError(fp16_advice(f"the fp16 loss scale is at its minimum ({self.min_loss_scale:g}) "
                                                  f"and the gradients still overflow")) from None
            raise

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (DeepSpeed scales by 1/grad_accum and by the loss scale).

        Raises:
            FP16HealthError: with the deferred overflow check, when the previous step, read here, overflowed
                at the minimum loss scale.
        """
        with self._fp16_health():
            self.ds.backward(loss)

    def step(self) -> None:
        """Every micro-batch: DeepSpeed steps the optimizer (and the LR schedule) at the accumulation boundary.

        Raises:
            FP16HealthError: when DeepSpeed's loss scaler overflows again at its minimum scale.
        """
        with self._fp16_health():
            self.ds.step()

    def settle(self) -> None:
        """Read the last optimizer step's outcome now if it is still on the device (the deferred overflow check,
        :mod:`pipeline.fp16_step`); afterwards the loss scale, skip count and LR are DeepSpeed's final values.
        A no-op otherwise.

        Raises:
            FP16HealthError: when that step overflowed at the minimum loss scale.
        """
        if self.deferred is not None:
            with self._fp16_health():
                self.deferred.resolve()

    def is_boundary(self) -> bool:
        """True when the next :meth:`step` call is an optimizer step (end of the accumulation window)."""
        return self.ds.is_gradient_accumulation_boundary()

    def last_step(self) -> StepResult:
        """The result of the optimizer step just taken (call right after the boundary :meth:`step`).

        No host synchronisation: the gradient norm is read from the device only when ``StepResult.grad_norm`` is
        accessed, and with the deferred overflow check ``applied`` and ``loss_scale`` are filled in when the host
        reads the flag (before the next backward; see :class:`StepResult`)."""
        if self.deferred is not None and self.deferred.result is not None:
            return self.deferred.result
        return StepResult(applied=bool(self.ds.was_step_applied()), loss_scale=self.loss_scale(),
                          grad_norm_value=self.ds.get_global_grad_norm())

    def loss_scale(self) -> float:
        """Current loss scale (1.0 without fp16)."""
        if self.precision != "fp16":
            return 1.0
        self.settle()
        opt = self.ds.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if v is not None:
                return float(v)
        return 1.0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because of fp16 overflow since the run began (restored on resume)."""
        self.settle()
        return int(self.ds.skipped_steps)

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (applied or skipped), as counted by DeepSpeed."""
        return int(self.ds.global_steps)

    def lr(self) -> float:
        """Learning rate of the first parameter group (the one the next step uses)."""
        self.settle()
        return float(self.ds.get_lr()[0])

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint ``save_dir/tag`` (model, optimizer and loss scaler, LR schedule, counters,
        ``client_state``).  Every rank must call this."""
        self.settle()
        self.ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=True)

    def load_checkpoint(self, load_dir: str | Path, tag: str) -> dict:
        """Load ``load_dir/tag`` with optimizer and LR-schedule state; returns the client state.
        Every rank must call this.

        Raises:
            RuntimeError: when DeepSpeed could not load it.
        """
        self.settle()
        path, client_state = self.ds.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        return client_state or {}

    # -- export ----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights in fp32 on CPU, on rank 0 (``None`` on other ranks).

        Taken from the optimizer's fp32 master weights (``deepspeed.utils.safe_get_full_fp32_param``,
        which gathers the partitions of ZeRO-1, 2 and 3 alike); parameters DeepSpeed keeps no master
        copy of are read from the module.  Tied tensors appear once, under their first name.
        Every rank must call this (it gathers across ranks).
        """
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective: every rank calls it for every parameter
            if full is None:
                if hasattr(p, "ds_id"):
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([p]):  # every rank must enter
                        full = p.data.detach().clone()
                else:
                    full = p.data
            if self.rank == 0:
                out[name] = full.detach().float().cpu().clone()
        for mod_name, mod in self.module.named_modules():
            for b_name, b in mod.named_buffers(recurse=False):
                if b is not None and b_name not in mod._non_persistent_buffers_set and self.rank == 0:
                    out[f"{mod_name}.{b_name}" if mod_name else b_name] = b.detach().cpu().clone()
        return out if self.rank == 0 else None

    def export_hf(self, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path | None:
        """Write a consolidated Hugging Face model directory (fp32 safetensors, config, tokenizer).

        A fresh copy of the model is built from its config on rank 0 and loaded with
        :meth:`full_state_dict`; ``save_pretrained`` keeps tied embeddings tied (one tensor on disk).
        Every rank must call this; only rank 0 writes.  Returns the directory on rank 0.

        Raises:
            RuntimeError: when the gathered weights do not fill the model (a missing or unexpected name).
        """
        sd = self.full_state_dict()
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = self.module.config
        with without_hf_zero3():  # rank 0 alone: must not enter the collective deepspeed.zero.Init
            # the trained class itself (an encoder's BertForMaskedLM / ...ForSequenceClassification); the decoders
            # get what AutoModelForCausalLM gives them
            make = getattr(type(self.module), "_from_config", None) or AutoModelForCausalLM.from_config
            model = make(config, attn_implementation="sdpa", dtype=torch.float32)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
        # tensors the model shares under a second name (BERT's masked-LM decoder weight and bias)
        tied |= {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"export: weights do not match the model (missing {missing}, unexpected {unexpected})")
        if config.tie_word_embeddings:
            model.tie_weights()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
        return out_dir


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
    methods.  Non-L2 norms and ZeRO-3 AutoEP expert groups fall back to DeepSpeed's own method at call time.

    One difference from DeepSpeed remains: its norm accumulates in fp64, this one in fp32.  For fp16 that
    changes nothing (see above); in bf16 a finite gradient above about 1.8e19 would make this norm overflow
    and the step be skipped, where DeepSpeed would clip it.
    """
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


def fp16_advice(cause: str) -> str:
    """The message fp16 health stops print: the cause and the options."""
    return (f"fp16 training stopped: {cause}. The last complete checkpoint is kept. Options: train in bf16 "
            f"(--precision bf16, on GPUs that have it), lower the learning rate (--lr), or allow a lower loss scale "
            f"(\"min_loss_scale\" in the DeepSpeed config's fp16 section); then resume with --resume auto")


def build_engine(model: torch.nn.Module, config: dict, precision: str, lr_lambda: Callable[[int], float],
                 adamw: dict, launcher: str, foreach_checks: bool = True, defer_overflow: bool = True) -> Engine:
    """Wrap ``model`` in a DeepSpeed engine with the resolved ``config`` (every rank must call this).

    DeepSpeed always builds the optimizer from the config's ``optimizer`` section; when the config has
    none, an AdamW section made of ``adamw`` is added.  The LR schedule is a
    ``torch.optim.lr_scheduler.LambdaLR`` handed to DeepSpeed (as a callable of the optimizer), so DeepSpeed
    steps it once per *applied* optimizer step and saves it in checkpoints.

    Args:
        model: the ``transformers`` model, fp32 on CPU, identical on every rank.
        config: the resolved DeepSpeed dict (no ``"auto"`` left).
        precision: the precision the config enables (``fp16``/``bf16``/``fp32``).
        lr_lambda: LR multiplier as a function of applied optimizer steps.
        adamw: ``lr``, ``betas``, ``eps``, ``weight_decay``; ``weight_decay`` also sets the decayed group
            (see :func:`param_groups`).
        launcher: ``accelerate`` builds through ``Accelerator``; anything else through ``deepspeed.initialize``.
        foreach_checks: replace ZeRO's per-tensor overflow and norm loops (:func:`use_foreach_grad_checks`);
            the result is in ``Engine.foreach_checks``.
        defer_overflow: give a ZeRO-1/2 fp16 optimizer the step without host synchronisations
            (:func:`pipeline.fp16_step.install`); ``Engine.deferred`` holds it, or ``None`` where it does not apply.
    """
    import deepspeed

    dev = device_type()
    note = sanitize_cuda_arch_list() if dev == "cuda" else None
    if note and dist.is_rank0():
        print(f"[engine] {note}", flush=True)
    config = dict(config)
    if "optimizer" not in config:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": adamw["lr"], "betas": list(adamw["betas"]), "eps": adamw["eps"],
            "weight_decay": adamw["weight_decay"]}}
    from pipeline.ds_config import adapt_to_device

    config = adapt_to_device(config, dev)  # off CUDA: torch AdamW instead of a JIT-built FusedAdam, no DeepCompile
    groups = param_groups(model, adamw["weight_decay"])

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    if launcher == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler

        plugin = DeepSpeedPlugin(hf_ds_config=config)
        acc = Accelerator(deepspeed_plugin=plugin, mixed_precision={"fp32": "no"}.get(precision, precision))
        p = config["optimizer"].get("params", {})
        opt = DummyOptim(groups, lr=p.get("lr", adamw["lr"]), weight_decay=p.get("weight_decay", 0.0))
        sched = DummyScheduler(opt, lr_scheduler_callable=make_scheduler)
        ds_engine, _, _ = acc.prepare(model, opt, sched)
        engine = Engine(ds_engine, acc.deepspeed_config, precision, "accelerate", launcher, accelerator=acc)
    else:
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config,
                                                  lr_scheduler=make_scheduler)
        engine = Engine(ds_engine, config, precision, "deepspeed", launcher)
    engine.foreach_checks = bool(foreach_checks) and use_foreach_grad_checks(ds_engine.optimizer)
    if defer_overflow:
        from pipeline import fp16_step

        engine.deferred = fp16_step.install(ds_engine)
        if engine.deferred is not None:
            engine.deferred.reader = engine.settle  # a StepResult read early raises FP16HealthError too
    return engine


@contextlib.contextmanager
def without_hf_zero3():
    """Let ``transformers`` build plain (unpartitioned) models while the block runs.

    Accelerate's DeepSpeed plugin registers its DeepSpeed config with ``transformers`` (an
    ``HfDeepSpeedConfig``, held in ``transformers.integrations.deepspeed``).  With ZeRO-3 registered, every
    ``from_config``/``from_pretrained`` then builds its model inside ``deepspeed.zero.Init``, which partitions
    each parameter as it is made, a collective (a broadcast per parameter).  A model built on one rank only
    (the export's copy on rank 0) then waits forever for ranks that are elsewhere.  That was seen under
    ``accelerate launch`` with 2 processes and ZeRO-3, on an H200 and on CPU.  The ``deepspeed`` launcher
    registers no such config.  Inside this block the registration is lifted and then restored."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def eval_mode(engine: Engine):
    """Evaluation mode and no gradients for the block; training mode again afterwards."""
    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train()
