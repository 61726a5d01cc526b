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
from pipeline.compat.hf import without_hf_zero3
from pipeline.compat.torch_compat import eager_forward, is_persistent_buffer
from pipeline.compat.zero_checks import use_foreach_grad_checks

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
    1.0 without fp16) are host values.  With the deferred overflow check (:mod:`pipeline.compat.fp16_step`) they are
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
        self.deferred = None  # set by build_engine: the pipeline.compat.fp16_step.DeferredOverflowStep, if installed

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
        with eager_forward(self.module):
            yield

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
        :mod:`pipeline.compat.fp16_step`); afterwards the loss scale, skip count and LR are DeepSpeed's final values.
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
                if b is not None and is_persistent_buffer(mod, b_name) and self.rank == 0:
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
            (:func:`pipeline.compat.fp16_step.install`); ``Engine.deferred`` holds it, or ``None`` where it does not apply.
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
        from pipeline.compat import fp16_step

        engine.deferred = fp16_step.install(ds_engine, StepResult)
        if engine.deferred is not None:
            engine.deferred.reader = engine.settle  # a StepResult read early raises FP16HealthError too
    return engine


@contextlib.contextmanager
def eval_mode(engine: Engine):
    """Evaluation mode and no gradients for the block; training mode again afterwards."""
    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train()
