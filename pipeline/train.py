"""The training loop shared by every stage that trains: stage 02 (pretraining), 02b (classification), stage 04
(distillation) and the compression controls.

:class:`Trainer` takes a built model and a stage's :class:`TrainConfig` and runs named phases (:meth:`Trainer.fit`):
plan (precision, the DeepSpeed config, the checkpoint to resume, every check before a file is written), prepare the
run dir, build the engine (:mod:`pipeline.engine`), the subclass's setup, resume, then per optimizer step the train
step (gradient accumulation, warmup + cosine LR, global-norm clipping, fp16 loss scaling), the after-step hook, the
log step, evaluation on the whole validation split with a text sample, the checkpoint (:mod:`pipeline.checkpoint`)
and the halt of resume drills; last the Hugging Face export.  A stage changes the objective by overriding
:meth:`Trainer.loss` (or passing ``loss_fn``); :class:`SparseTrainer` keeps pruning masks at zero after every step;
:class:`pipeline.distill.Distiller` adds the teacher.  :func:`run_training` is ``Trainer(...).fit()``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pipeline import checkpoint as ckpt
from pipeline import dist
from pipeline.cli import TrainingHalted  # noqa: F401  (re-exported: raised by Trainer.fit)
from pipeline.config import CommonConfig, config_hash, doc, to_dict
from pipeline.engine import Engine, FP16HealthError, build_engine, eval_mode, fp16_advice, init_distributed
from pipeline.health import set_aside_unhealthy
from pipeline.manifest import read_manifest
from pipeline.metrics import MetricsLogger, truncate_metrics  # noqa: F401  (truncate_metrics re-exported)
from pipeline.model import ModelConfig, count_params, flops_per_token, mfu, peak_tflops_for
from pipeline.regime import RegimeTracker
from pipeline.sampler import GlobalBatchSampler, eval_shard
from pipeline.tokens import BlockDataset, load_tokens

# run-control fields (marked ``run_control=True`` below, see pipeline.config.doc) change how a run is driven, not
# what it computes (beyond rounding): they are left out of the config hash, and a checkpoint resumes across them
#: settings a checkpoint resumes across although they change what is computed from there on; the change is
#: applied on resume and recorded (the fp16/health stops advise a lower --lr, then --resume auto)
RESUMABLE_CHANGES = ("lr",)




@dataclass
class TrainConfig(CommonConfig):
    """Stage 02 settings (preset section ``pretrain``); stage 04 extends it."""

    model: ModelConfig = doc("Model shape (dotted keys: --model.n_layer 4).", default_factory=ModelConfig)
    init_from: str = doc("Start from this Hugging Face model directory instead of a fresh initialisation.", "")
    ds_config: str = doc("DeepSpeed config template (strict JSON with 'auto' fields), see ds_configs/README.md.",
                         "ds_configs/zero2_fp16.json")
    zero_stage: int | None = doc("ZeRO stage 1, 2 or 3 (None: the template's).", None)
    precision: Literal["auto", "fp16", "bf16", "fp32"] = doc(
        "Training precision; auto = fp16 with dynamic loss scaling on CUDA, bf16 where fp16 cannot run.", "auto")
    micro_batch_size: int = doc("Sequences per micro-batch per rank.", 16)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step.", 1)
    max_steps: int = doc("Optimizer steps (applied or skipped) of the whole run.", 600)
    lr: float = doc("Peak learning rate (after warmup).", 2e-3)
    min_lr_ratio: float = doc("Final LR of the cosine decay as a share of the peak.", 0.1)
    warmup_steps: int = doc("Linear warmup length in applied optimizer steps.", 40)
    weight_decay: float = doc("AdamW decoupled weight decay (matrices only).", 0.1)
    betas: list[float] = doc("AdamW (beta1, beta2).", default_factory=lambda: [0.9, 0.95])
    eps: float = doc("AdamW epsilon.", 1e-8)
    grad_clip: float = doc("Clip the global gradient L2 norm to this (0: no clipping).", 1.0)
    eval_interval: int = doc("Evaluate on the whole validation split every N steps (and at the end).", 200)
    eval_batch_size: int = doc("Sequences per evaluation batch per rank (0: micro_batch_size).", 0)
    save_interval: int = doc("Save a checkpoint every N steps (and at the end).", 200)
    keep_last: int = doc("Keep the newest K checkpoints (0: all).", 2)
    log_interval: int = doc("Log training metrics every N steps.", 20)
    resume: str = doc("'auto' (newest complete checkpoint, else from scratch), 'none', or a checkpoint dir.", "auto",
                      run_control=True)
    compile: Literal["auto", "on", "off"] = doc(
        "torch.compile the model and the loss (DeepSpeed engine.compile); auto = on for CUDA with ZeRO stage 0-2, "
        "and for ZeRO-3 when the DeepSpeed config enables DeepCompile; never off the GPU (see compile_policy).", "auto",
        run_control=True)
    foreach_checks: bool = doc("Multi-tensor overflow checks (ZeRO-1/2) and gradient norm (ZeRO-1/2/3), which in "
                               "fp16 adds no host synchronisation (pipeline.compat.zero_checks).", True,
                               run_control=True)
    defer_overflow: bool = doc("ZeRO-1/2 fp16: launch each optimizer step without waiting for its overflow check, "
                               "which the host reads before the next backward; same updates and skips, no host "
                               "synchronisation per step (pipeline.compat.fp16_step).", True,
                               run_control=True)
    peak_tflops: float = doc("Peak TFLOP/s of one device for MFU (0: look the GPU up in a table).", 0.0)
    max_skipped_fraction: float = doc("Stop when more than this share of the last skip_window steps overflowed.",
                                      0.5)
    skip_window: int = doc("Window (steps) for max_skipped_fraction.", 50)
    sample_prompt: str = doc("Prompt of the text sample generated at each evaluation ('' = BOS only).", "")
    sample_tokens: int = doc("Tokens generated for the sample (0: no sample).", 32)
    progress: bool = doc("Show a progress bar on rank 0.", True, run_control=True)
    halt_after_step: int = doc("Stop right after this step's checkpoint as if killed (resume drills); 0 = never.",
                               0, run_control=True)
    watchdog_s: float = doc("Hang diagnosis: when one step (with its evaluation and checkpoint) or the export takes "
                            "longer than this many seconds, every rank prints all its threads' Python stacks to "
                            "stderr, again every as many seconds (0: off).", 0.0,
                            run_control=True)

    def validate(self) -> list[str]:
        from pipeline.health import nonfinite_settings

        p = self.model.validate() + nonfinite_settings(self)  # inf/NaN in any float setting (lr, temperature...)
        for name in ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "save_interval", "log_interval",
                     "skip_window"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_last", "eval_batch_size", "sample_tokens", "halt_after_step"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            p.append(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.watchdog_s < 0:
            p.append(f"watchdog_s must be >= 0 (0: off), got {self.watchdog_s}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0 or self.peak_tflops < 0:
            p.append("weight_decay, grad_clip and peak_tflops must be >= 0 and eps > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            p.append(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0.0 < self.max_skipped_fraction <= 1.0:
            p.append(f"max_skipped_fraction must be in (0, 1], got {self.max_skipped_fraction}")
        if not Path(self.ds_config).is_file():
            p.append(f"ds_config '{self.ds_config}' does not exist; pass one of ds_configs/*.json")
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            p.append(f"init_from '{self.init_from}' is not a Hugging Face model directory (no config.json)")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            p.append(f"resume '{self.resume}' is neither 'auto', 'none' nor a checkpoint directory")
        return p


# ---------------------------------------------------------------------------------------------
# data, schedule, loss


@dataclass
class TrainData:
    """Stage-01 data as the loop needs it: train/val block datasets and the tokenizer folder."""

    train: BlockDataset
    val: BlockDataset
    tokenizer_dir: Path
    seq_len: int
    data_dir: Path

    @classmethod
    def from_manifest(cls, manifest: dict) -> TrainData:
        """From a stage-01 manifest as returned by ``require_stage(run_dir, "data")``."""
        d = Path(manifest["_dir"])
        out = manifest["outputs"]
        seq_len = int(out["seq_len"])
        return cls(train=BlockDataset(load_tokens(d, "train", manifest), seq_len),
                   val=BlockDataset(load_tokens(d, "val", manifest), seq_len),
                   tokenizer_dir=d / out["tokenizer_dir"], seq_len=seq_len, data_dir=d)


@dataclass
class WarmupCosine:
    """LR multiplier: linear warmup ``(s+1)/warmup`` then cosine decay to ``min_ratio`` at ``total`` steps.

    ``s`` counts applied optimizer steps (LambdaLR's step count).  Cosine schedule: Loshchilov & Hutter (2017),
    SGDR; warmup as in Goyal et al. (2017).  A class, not a closure, so LambdaLR saves it in checkpoints.
    """

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token, computed in fp32 from logits of any precision.

    Args:
        logits: ``(..., V)`` fp16/bf16/fp32.
        targets: ``(...)`` int64 token ids.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


@functools.cache
def _compiled_ce() -> Callable:
    return torch.compile(token_cross_entropy)  # compiles at its first call, once per input shape


def compiled_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`token_cross_entropy` through ``torch.compile``: inductor fuses the fp32 up-cast, log-softmax and
    gather into kernels that read the fp16/bf16 logits once, instead of eager mode's fp32 copy of the whole
    ``(B·T, V)`` logits (1 GiB at 16k tokens × 16k vocabulary) plus an fp32 log-softmax of the same size, in
    the forward and again in the backward.  Same result up to fp32 rounding order."""
    return _compiled_ce()(logits, targets)


def causal_lm_loss(model: Any, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy (nats per token) of a batch of blocks.

    Args:
        model: a causal LM (or the :class:`~pipeline.engine.Engine` wrapping one) returning ``.logits``;
            when it is a compiled engine (``model.compiled``), the loss is the compiled, fused
            :func:`compiled_token_cross_entropy`.
        batch: int64 tensor ``(B, T + 1)``; inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]`` (already
            shifted, so no shifted copy of the logits is made).

    Returns:
        (scalar loss, {}); the loss is computed in fp32 from the model's logits.
    """
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=x).logits
    ce = compiled_token_cross_entropy if getattr(model, "compiled", False) else token_cross_entropy
    return ce(logits, y), {}


def arm_watchdog(seconds: float, file: Any = None) -> None:
    """(Re)start the hang watchdog: if it is not re-armed or disarmed within ``seconds``, print every thread's
    Python stack to ``file`` (stderr), and again every ``seconds`` (``faulthandler.dump_traceback_later``).
    Each rank prints its own stacks: in a collective hang the rank that is elsewhere is the answer.
    ``seconds <= 0`` does nothing."""
    if seconds > 0:
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(seconds, repeat=True, file=file or sys.stderr)


def disarm_watchdog() -> None:
    """Stop the watchdog started by :func:`arm_watchdog` (no-op when none runs)."""
    import faulthandler

    faulthandler.cancel_dump_traceback_later()


def resolve_run_ds_config(cfg: TrainConfig, template: str | Path | dict, world_size: int, precision: str) -> dict:
    """The DeepSpeed config of a run: ``template`` resolved (:func:`pipeline.ds_config.resolve_ds_config`) from
    ``cfg``'s micro-batch, accumulation, AdamW settings, clipping and ZeRO stage.

    Raises:
        DSConfigError: as :func:`pipeline.ds_config.resolve_ds_config`.
    """
    from pipeline.ds_config import resolve_ds_config

    return resolve_ds_config(
        template, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, world_size=world_size,
        lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, grad_clip=cfg.grad_clip,
        precision=precision, zero_stage=cfg.zero_stage)


def build_training_engine(model: torch.nn.Module, cfg: TrainConfig, resolved: dict, precision: str,
                          lr_lambda: Callable[[int], float], launcher: str, device_type: str) -> tuple[Engine, str]:
    """The training engine as the stages run it: :func:`pipeline.engine.build_engine` with ``cfg``'s AdamW
    settings and ``--foreach_checks``, compiled when :func:`compile_policy` says so.  Returns the engine and
    one log line saying what was chosen.  Every rank must call this."""
    engine = build_engine(model, resolved, precision, lr_lambda,
                          dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay),
                          launcher, foreach_checks=cfg.foreach_checks, defer_overflow=cfg.defer_overflow)
    deepcompile = bool((engine.config.get("compile") or {}).get("deepcompile"))  # as adapted to the device
    use_compile, why = compile_policy(cfg.compile, device_type, engine.zero_stage, deepcompile)
    if use_compile:
        engine.compile()  # every rank
    return engine, (f"{why}; multi-tensor overflow/norm checks {'on' if engine.foreach_checks else 'off'}; "
                    f"deferred fp16 overflow check {'on' if engine.deferred is not None else 'off'}")


def compile_policy(setting: str, device_type: str, zero_stage: int, deepcompile: bool = False) -> tuple[bool, str]:
    """Whether to compile the model (``engine.compile()``), and why (one line for the log).

    ``auto`` compiles on CUDA for ZeRO stages 0-2 (``torch.compile``, inductor), and for ZeRO-3 only when the
    DeepSpeed config turns DeepCompile on (``"compile": {"deepcompile": true}``, as ``ds_configs/zero3_fp16.json``
    does); never off the GPU.  Measured on one H200 (``results/bench/NOTES.md``, DeepSpeed 0.19.8, PyTorch 2.11,
    124m preset): ZeRO-2 fp16 0.39x -> 0.64x of the plain PyTorch baseline with compile; ZeRO-3 fp16 eager
    88.5k tok/s, plain ``torch.compile`` no better (its parameter-gathering hooks break the graph at every
    module), DeepCompile 306k (0.77x of ZeRO-2 in the same run; 0.89x since ZeRO-3's gradient norm is
    multi-tensor too).  On CPU, inductor's compile time exceeds what a short run gains, and DeepCompile needs CUDA.
    """
    dc = ", DeepCompile" if deepcompile else ""
    if setting == "on":
        return True, f"compile on (compile=on{dc})"
    if setting == "off":
        return False, "compile off (compile=off)"
    if device_type != "cuda":
        return False, f"compile off (auto: device {device_type}, not CUDA)"
    if zero_stage >= 3 and not deepcompile:
        return False, ("compile off (auto: ZeRO-3 without DeepCompile; its hooks break torch.compile's graph at every "
                       "module; set \"compile\": {\"deepcompile\": true} in the DeepSpeed config)")
    return True, f"compile on (auto: CUDA, ZeRO stage {zero_stage}{dc})"


LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def data_identity(data_dir: str | Path) -> str:
    """What identifies the stage-01 data a checkpoint trained on: its configuration, tokenizer and token counts
    (stable when stage 01 is re-made with the same settings and corpus, unlike the manifest's timestamps)."""
    m = read_manifest(data_dir)
    return json.dumps([m["outputs"].get("config_hash"), m["outputs"].get("tokenizer_sha256"),
                       m["metrics"].get("train_tokens"), m["metrics"].get("val_tokens")])


def resume_step_of(path: str | Path) -> int:
    """The optimizer step a checkpoint directory was saved at (its marker's, else its ``step<N>`` name; a universal
    folder ``step<N>_universal`` counts as step N)."""
    m = ckpt.marker(path)
    if "step" in m:
        return int(m["step"])
    import re

    found = re.search(r"step(\d+)", Path(path).name)
    return int(found.group(1)) if found else 0


def _logged(path: Path, step: int, name: str) -> bool:
    from pipeline.metrics import read_metrics

    try:
        return any(r.get("step") == step and name in r for r in read_metrics(path))
    except (OSError, ValueError):
        return False


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)  # collective: every rank
    return t


@torch.no_grad()
def evaluate(model: Any, val: BlockDataset, batch_size: int, device: torch.device | str,
             world_size: int = 1, rank: int = 0) -> tuple[float, float, int]:
    """Token-weighted mean cross-entropy over the whole validation split, split across ranks.

    Rank ``r`` reads blocks ``r, r+W, ...`` (:func:`pipeline.sampler.eval_shard`); the sums of losses and
    token counts are all-reduced, so no block counts twice.  Every rank must call this (collective, and under
    ZeRO-3 each forward gathers parameters).

    Returns:
        (val_loss in nats per token, perplexity ``exp(val_loss)``, tokens scored).
    """
    was_training = getattr(model, "training", False)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for idx in eval_shard(len(val), world_size, rank, batch_size):
        weights = torch.tensor([1.0 if i >= 0 else 0.0 for i in idx], device=device)
        batch = torch.stack([val[max(i, 0)] for i in idx]).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=x).logits
        tok = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        tok = tok.view(y.shape).sum(dim=1)
        loss_sum += (tok * weights).sum().double()
        count += weights.sum().double() * y.size(1)
    _all_reduce_sum(loss_sum)
    _all_reduce_sum(count)
    if was_training:
        model.train()
    loss = (loss_sum / count).item()
    return loss, math.exp(min(loss, 700.0)), int(count.item())


@torch.no_grad()
def generate_sample(engine: Engine, tokenizer: Any, prompt: str, n_tokens: int, seed: int,
                    temperature: float = 0.8, top_k: int = 50) -> str:
    """Sample ``n_tokens`` after ``prompt`` (top-k, temperature), with the model's weights as they are now.

    Every rank must call this: under ZeRO-3 each forward gathers parameters; the token chosen on rank 0 is
    broadcast so the ranks stay in step.  Uses its own generator (seeded with ``seed``), leaving the
    training RNG untouched.  Returns the decoded prompt + continuation.
    """
    import torch.distributed as tdist

    model = engine.module
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    ids = torch.tensor([ids or [0]], device=engine.device)
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with eval_mode(engine):
        for _ in range(n_tokens):
            # through the DeepSpeed engine's forward: under DeepCompile's ZeRO-3 only it gathers the parameters
            logits = engine.ds(input_ids=ids[:, -max_pos:]).logits[0, -1].float().cpu()
            v, i = torch.topk(logits / temperature, min(top_k, logits.numel()))
            nxt = i[torch.multinomial(torch.softmax(v, -1), 1, generator=g)].to(engine.device)
            if tdist.is_initialized() and tdist.get_world_size() > 1:
                tdist.broadcast(nxt, src=0)  # collective: every rank
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# the loop


class LossScaleMonitor:
    """fp16 health: stop when the loss scale reaches its minimum, or too many recent steps overflowed.

    Args:
        min_loss_scale: the DeepSpeed config's ``fp16.min_loss_scale`` (``None``: not fp16, never stops).
        max_skipped_fraction: stop when more than this share of ``window`` steps were skipped.
        window: number of most recent optimizer steps considered.
    """

    def __init__(self, min_loss_scale: float | None, max_skipped_fraction: float, window: int,
                 precision: str | None = None):
        self.min_loss_scale = min_loss_scale
        self.max_skipped = max_skipped_fraction * window
        self.max_skipped_fraction = max_skipped_fraction
        self.window = window
        self.recent: deque[int] = deque(maxlen=window)
        self.recent_steps: deque[int] = deque(maxlen=window)
        # outside fp16 (precision given) a skipped step is never normal: judged over the steps seen so far
        self.precision = precision

    def first_skipped(self) -> int | None:
        """The earliest skipped step of the window (where the trouble the stop judges began)."""
        return next((s for s, bad in zip(self.recent_steps, self.recent) if bad), None)

    def update(self, applied: bool, loss_scale: float, step: int) -> None:
        """Record one optimizer step (``applied`` False: skipped on overflow, ``loss_scale`` after it).

        Raises:
            FP16HealthError: naming the cause and the options (bf16, a lower LR, a lower min_loss_scale).
            TrainingHealthError: outside fp16, when more than ``max_skipped_fraction`` of the steps of the window
                seen so far were skipped (non-finite gradients).
        """
        self.recent.append(0 if applied else 1)
        self.recent_steps.append(int(step))
        if applied:
            return
        if self.min_loss_scale is None:
            if self.precision is not None and sum(self.recent) > self.max_skipped_fraction * len(self.recent):
                from pipeline.health import TrainingHealthError, advice

                raise TrainingHealthError(advice(
                    f"{sum(self.recent)} of the last {len(self.recent)} steps were skipped (non-finite gradients; "
                    f"limit: {self.max_skipped_fraction:g} of them) by step {step}", self.precision))
            return
        if loss_scale <= self.min_loss_scale:
            raise FP16HealthError(fp16_advice(
                f"the loss scale fell to its minimum ({self.min_loss_scale:g}) at step {step} and the step overflowed"))
        if sum(self.recent) > self.max_skipped:
            raise FP16HealthError(fp16_advice(
                f"{sum(self.recent)} of the last {len(self.recent)} steps overflowed and were skipped (limit: "
                f"{self.max_skipped:g} of {self.window}) by step {step}"))


@dataclass
class TrainResult:
    """What a training run did; the stage writes it into its manifest."""

    val_loss: float
    val_ppl: float
    steps: int
    tokens_seen: int
    skipped_steps: int
    loss_scale: float
    precision: str
    precision_note: str | None
    world_size: int
    launcher: str
    backend: str
    zero_stage: int
    ds_config_resolved: str
    model_dir: str
    n_params: int
    tokens_per_s: float | None
    mfu: float | None
    resumed_from: str | None
    history: dict[str, list] = field(default_factory=dict)
    regime: dict[str, Any] = field(default_factory=dict)  # pipeline.regime: tokens per parameter, epochs, gap
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's extra figures (eval_fn)
    lr_changed_from: float | None = None  # the checkpoint's --lr when this run resumed it with another


def _log(msg: str) -> None:
    if dist.is_rank0():
        print(f"[train] {msg}", flush=True)


class Trainer:
    """The training loop of every stage that trains, as named phases (after torchtitan's ``Trainer``).

    Every rank builds one with the same arguments and calls :meth:`fit`; whatever the launcher (python,
    ``deepspeed``, ``accelerate launch``), the same loop runs.  The phases, in the order :meth:`fit` runs them:

    - :meth:`plan`: launcher, precision, the resolved DeepSpeed config, the sampler, which checkpoint to resume
      and the checks that refuse it, before anything is written;
    - :meth:`prepare_run_dir`: the stage folder as a fresh start or a resume needs it (rank 0);
    - :meth:`build_engine`, then :meth:`setup` (a subclass's own set-up: masks, a teacher);
    - :meth:`resume`: the checkpoint's weights, optimizer, sampler and :meth:`restore_state`;
    - per optimizer step: :meth:`train_step` (micro-batches of :meth:`loss`, backward, step), :meth:`after_step`,
      :meth:`log_step`, :meth:`evaluate`, :meth:`save` (with :meth:`checkpoint_state`), :meth:`halt`;
    - :meth:`export`: the Hugging Face model in ``out_dir/model``.

    A stage changes the objective by overriding :meth:`loss` (or passing ``loss_fn``) and the validation by passing
    ``eval_fn``; :class:`SparseTrainer` keeps pruning masks, :class:`pipeline.distill.Distiller` adds a teacher.

    Args:
        cfg: a :class:`TrainConfig` (or a subclass: stage 04).
        model: a ``transformers`` model in fp32 on CPU, identically initialised on every rank.
        stage: the stage name (``pretrain``, ``distill``, a control's name), used in messages.
        out_dir: the stage directory; gets ``ds_config.resolved.json``, ``metrics.jsonl``, ``checkpoints/`` and
            ``model/`` (the export, with the tokenizer of ``data.tokenizer_dir`` beside it).
        tb_dir: TensorBoard folder (``results/<run>/tb/<stage>``) or ``None``.
        data: train/val blocks and tokenizer (:meth:`TrainData.from_manifest`).
        loss_fn: ``(model, batch) -> (loss, extra_metrics)``; default :func:`causal_lm_loss`.  ``model`` is the
            engine (callable like the model); ``batch`` an int64 ``(B, T+1)`` tensor on the device; the extra
            metrics (names such as ``kd/kl``, floats or 0-d tensors) are averaged over the accumulation window
            and the ranks and logged with the training metrics.
        eval_fn: replaces the causal-LM validation: ``(model, val, batch_size, device, world, rank) -> (val_loss,
            extra)`` with ``model`` the DeepSpeed engine; ``extra`` (name -> float, e.g. ``val/mlm_accuracy``) is
            logged beside ``val/loss`` and kept in ``TrainResult.val_metrics``.  Every rank calls it.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, *, stage: str, out_dir: str | Path,
                 tb_dir: str | Path | None, data: TrainData, loss_fn: LossFn | None = None,
                 eval_fn: Callable[..., tuple[float, dict[str, float]]] | None = None):
        self.cfg, self.model, self.stage, self.data = cfg, model, stage, data
        self.out_dir = Path(out_dir)
        self.tb_dir = tb_dir
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.loss_fn = loss_fn or causal_lm_loss
        self.eval_fn = eval_fn
        self.engine: Engine | None = None
        self.step, self.tokens_seen = 0, 0
        self.lr_changed_from: float | None = None
        self.val_metrics: dict[str, float] = {}
        self.history: dict[str, list] = {"step": [], "loss": [], "loss_scale": [], "skipped": []}
        self.bar = None

    # -- phases before the loop -------------------------------------------------------------------

    def plan(self) -> None:
        """Everything decided and checked before a file is written: the launcher (every rank joins the process
        group), precision, the resolved DeepSpeed config, the sampler, the checkpoint to resume and the config
        hash it must match.

        Raises:
            DSConfigError: a bad DeepSpeed template or batch arithmetic.
            ValueError: a validation split without one block.
            CheckpointError: a checkpoint of another configuration (without ``--overwrite``) or world size.
        """
        from pipeline.ds_config import adapt_to_device, resolve_precision, template_from_env
        from pipeline.engine import device_type

        cfg, data = self.cfg, self.data
        self.launcher = init_distributed()  # every rank
        self.world, self.rank = dist.world_size(), dist.rank()
        self.dev_type = device_type()
        self.precision, self.precision_note = resolve_precision(cfg.precision, self.dev_type)
        # under `accelerate launch`, the template its yaml names (deepspeed_config_file) is the one chosen
        template = template_from_env(cfg.ds_config) if self.launcher == "accelerate" else cfg.ds_config
        # the resolved file shows what DeepSpeed gets: adapted to the device (torch AdamW and no DeepCompile off CUDA)
        self.resolved = adapt_to_device(resolve_run_ds_config(cfg, template, self.world, self.precision),
                                        self.dev_type)
        self.sampler = GlobalBatchSampler(len(data.train), cfg.micro_batch_size, cfg.grad_accum, self.world,
                                          self.rank, cfg.seed, world_source=dist.world_size_source(self.launcher))
        if len(data.val) < 1:
            raise ValueError(f"the validation split has no block of seq_len {data.seq_len}; remake stage 01 with a "
                             f"larger --val_fraction")
        # every rank; files checked against their hashes
        resume_path = ckpt.find_verified_resume(self.ckpt_dir, cfg.resume)
        # what a checkpoint must match to be resumed: the configuration and the stage-01 data it trained on
        chash = config_hash(cfg, also_ignore=RESUMABLE_CHANGES)
        self.chash = hashlib.sha256(f"{chash}:{data_identity(data.data_dir)}".encode()).hexdigest()[:16]
        if resume_path is not None and cfg.resume == "auto":
            saved = ckpt.marker(resume_path).get("config_hash")
            if saved not in (None, self.chash):
                if not cfg.overwrite:
                    raise ckpt.CheckpointError(
                        f"{resume_path} was saved by a run with another configuration or other stage-01 data "
                        f"({saved}; this run {self.chash}): pass --overwrite to start afresh (its checkpoints are "
                        f"deleted), or run with the configuration it was made with")
                _log(f"--overwrite: not resuming {resume_path} (another configuration); starting afresh")
                resume_path = None
        if resume_path is not None:
            ckpt.check_world_size(resume_path, self.world, self.resolved)  # refuse before anything is written
        self.resume_path = resume_path

    def prepare_run_dir(self) -> None:
        """Rank 0 readies the stage folder: the manifest goes (the stage is incomplete until it is written again);
        a fresh start deletes the old logs, checkpoints and TensorBoard folder, a resume drops the metrics rows
        past the resumed step (they are replayed); then the resolved DeepSpeed config is written."""
        from pipeline.stage_output import StageOutput

        if self.rank == 0:
            StageOutput(self.out_dir, self.tb_dir).begin_in_place(
                None if self.resume_path is None else resume_step_of(self.resume_path), also_fresh=(self.ckpt_dir,))
        from pipeline.ds_config import write_resolved

        self.resolved_path = (write_resolved(self.resolved, self.out_dir) if self.rank == 0
                              else self.out_dir / "ds_config.resolved.json")
        if self.precision_note:
            _log(self.precision_note)
        _log(f"{self.stage}: launcher {self.launcher}, world size {self.world}, device {self.dev_type}, precision "
             f"{self.precision}, ZeRO stage {self.resolved.get('zero_optimization', {}).get('stage')}")

    def build_engine(self) -> None:
        """The model's size figures (parameters, FLOPs per token, MFU peak), the LR schedule and the engine
        (:func:`build_training_engine`).  Every rank must call this."""
        cfg, data, model = self.cfg, self.data, self.model
        self.n_params = count_params(model)
        self.fpt = flops_per_token(self.n_params, model.config.num_hidden_layers, model.config.hidden_size,
                                   data.seq_len)
        self.regime = RegimeTracker(self.n_params, len(data.train) * data.seq_len)  # diagnostics at each evaluation
        peak = cfg.peak_tflops or None
        if peak is None and self.dev_type == "cuda" and torch.cuda.is_available():
            peak = peak_tflops_for(torch.cuda.get_device_name())
        if peak is None:
            _log("train/mfu is not logged: the device's peak TFLOP/s is unknown; pass --peak_tflops")
        self.peak = peak
        schedule = WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.engine, speed_note = build_training_engine(model, cfg, self.resolved, self.precision, schedule,
                                                        self.launcher, self.dev_type)
        _log(speed_note)

    def setup(self) -> None:
        """A subclass's own set-up once the engine exists and before resuming (masks, a teacher).  Every rank
        calls it."""

    def resume(self) -> None:
        """Load :attr:`resume_path` (weights, optimizer, LR schedule, sampler; every rank), apply a changed
        ``--lr`` (:data:`RESUMABLE_CHANGES`) and hand the client state to :meth:`restore_state`."""
        if self.resume_path is None:
            return
        cfg, engine = self.cfg, self.engine
        state = ckpt.load(engine, self.resume_path)  # every rank
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.sampler.load_state_dict(state["sampler"])
        saved_lr = state.get("lr")
        if saved_lr is not None and float(saved_lr) != cfg.lr:
            ckpt.override_peak_lr(engine, cfg.lr)
            self.lr_changed_from = float(saved_lr)
            _log(f"resuming with --lr {cfg.lr:g} instead of the checkpoint's {saved_lr:g} (recorded in the manifest)")
        if state.get("config_hash") not in (None, self.chash):
            _log(f"warning: resuming a checkpoint made with config {state.get('config_hash')} (this run: "
                 f"{self.chash})")
        self.restore_state(state)
        _log(f"resumed from {self.resume_path} at step {self.step} ({self.tokens_seen} tokens seen)")

    def checkpoint_state(self) -> dict:
        """More items for each checkpoint's client state (a subclass's; none here)."""
        return {}

    def restore_state(self, client: dict) -> None:
        """Receives the client state of the checkpoint being resumed (what :meth:`checkpoint_state` added)."""

    def start_loop(self) -> None:
        """The loop's companions: tokenizer (samples), metrics logger, fp16 and non-finite health monitors,
        progress bar."""
        from transformers import AutoTokenizer

        from pipeline.health import NonFiniteLossWatch

        cfg, engine = self.cfg, self.engine
        self.tokenizer = AutoTokenizer.from_pretrained(self.data.tokenizer_dir)
        self.logger = MetricsLogger(self.out_dir / "metrics.jsonl", self.tb_dir,
                                    purge_step=self.step + 1 if self.resume_path else None)
        self.global_tokens = self.sampler.global_batch * self.data.seq_len
        self.eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
        fp16 = self.precision == "fp16"
        self.monitor = LossScaleMonitor(engine.min_loss_scale if fp16 else None, cfg.max_skipped_fraction,
                                        cfg.skip_window, precision=None if fp16 else self.precision)
        self.nonfinite = NonFiniteLossWatch(cfg.skip_window, engine.device)  # every precision
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True)
        self.pin = engine.device.type == "cuda"
        self.t_log, self.steps_since_log, self.tps_sum, self.tps_n = time.perf_counter(), 0, 0.0, 0
        self.last_mfu = None
        self.unchecked: tuple[int, Any] | None = None  # (step, StepResult) the fp16 monitor has not seen yet

    # -- phases of one step -----------------------------------------------------------------------

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The training loss of one micro-batch ``(B, T+1)`` on the device and extra metrics to log (``loss_fn``'s
        by default).  Every rank calls it for every micro-batch."""
        return self.loss_fn(self.engine, batch)

    def check_health(self) -> None:
        """Hand the fp16 monitor the newest step outcome it has not seen (raises FP16HealthError)."""
        if self.unchecked is not None:
            at, r = self.unchecked
            self.unchecked = None
            self.monitor.update(r.applied, r.loss_scale, at)

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the summed loss, the summed extra metrics
        (on the device) and the LR the step used."""
        engine, data = self.engine, self.data
        lr_now = None
        loss_acc = torch.zeros((), device=engine.device, dtype=torch.float32)
        extras: dict[str, torch.Tensor] = {}
        for idx in self.sampler.next_step():
            batch = torch.stack([data.train[i] for i in idx])
            if self.pin:  # page-locked, so the copy is asynchronous and the host goes on queueing work
                batch = batch.pin_memory()
            batch = batch.to(engine.device, non_blocking=True)
            loss, extra = self.loss(batch)
            engine.backward(loss)
            if lr_now is None:
                # the previous step's outcome was read before this backward scaled its loss (deferred fp16
                # overflow check), so neither of these waits for the GPU; the LR is the one this step uses
                self.check_health()
                lr_now = engine.lr()
            engine.step()
            loss_acc += loss.detach().float()
            for k, v in extra.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=engine.device).detach()
                extras[k] = extras.get(k, torch.zeros((), device=engine.device)) + v
        self.step += 1
        self.tokens_seen += self.global_tokens
        self.steps_since_log += 1
        return loss_acc, extras, lr_now

    def after_step(self) -> None:
        """Called after every optimizer step, applied or skipped (:class:`SparseTrainer` re-applies its masks).
        A skipped step changed no weight, so what runs here must be harmless to repeat: whether a step was
        applied is known only at the next backward (the deferred fp16 overflow check).  Every rank calls it."""

    def log_step(self, res: Any, loss_acc: torch.Tensor, extras: dict[str, torch.Tensor], lr_now: float) -> None:
        """One row of training metrics: the global batch's mean token loss (over the accumulation window and the
        ranks; a collective, every rank), LR, loss scale, skipped steps, tokens/s, gradient norm, MFU, extras."""
        cfg, engine, step = self.cfg, self.engine, self.step
        vals = torch.stack([loss_acc, *extras.values()]) / cfg.grad_accum
        vals = _all_reduce_sum(vals) / self.world
        now = time.perf_counter()
        tps = self.global_tokens * self.steps_since_log / max(now - self.t_log, 1e-9)
        row = {"train/loss": vals[0].item(), "train/lr": lr_now, "train/loss_scale": res.loss_scale,
               "train/skipped_steps": engine.skipped_steps, "train/tokens_per_s": tps}
        grad_norm = res.grad_norm  # read from the device on logged steps only (a host synchronisation)
        if grad_norm is not None:
            row["train/grad_norm"] = grad_norm
        if self.peak:
            self.last_mfu = mfu(tps, self.fpt, self.peak, self.world)
            row["train/mfu"] = self.last_mfu
        row.update({k: v.item() for k, v in zip(extras, vals[1:])})
        self.logger.log(step, row)
        self.history["step"].append(step)
        self.history["loss"].append(row["train/loss"])
        self.history["loss_scale"].append(res.loss_scale)
        self.history["skipped"].append(engine.skipped_steps)
        if step > cfg.log_interval:  # the first interval holds start-up costs
            self.tps_sum, self.tps_n = self.tps_sum + tps, self.tps_n + 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{lr_now:.2e}", scale=f"{res.loss_scale:g}")
        self.t_log, self.steps_since_log = time.perf_counter(), 0

    def validate(self) -> tuple[float, dict[str, float]]:
        """Validation loss and extra figures of the model as it is now (``eval_fn``'s, else :func:`evaluate`'s
        loss and ``val/ppl``).  Every rank calls it."""
        engine, data = self.engine, self.data
        if self.eval_fn is None:
            loss, ppl, _ = evaluate(engine.ds, data.val, self.eval_bs, engine.device, self.world, self.rank)
            return loss, {"val/ppl": ppl}
        loss, extra = self.eval_fn(engine.ds, data.val, self.eval_bs, engine.device, self.world, self.rank)
        self.val_metrics.clear()
        self.val_metrics.update(extra)
        return loss, extra

    def evaluate(self, at: int, log: bool = True) -> tuple[float, float]:
        """Validate, log ``val/*`` and the data-regime scalars, and a text sample; returns (loss, perplexity).
        Every rank calls it."""
        cfg, engine = self.cfg, self.engine
        with engine.uncompiled():
            loss, extra = self.validate()  # every rank
            ppl = extra["val/ppl"] if self.eval_fn is None else math.exp(min(loss, 700.0))
            scalars, warnings = self.regime.at_eval(at, self.tokens_seen, loss, self.history)
            if log:
                self.logger.log(at, {"val/loss": loss, **extra})
                self.logger.log(at, scalars)
            if cfg.sample_tokens > 0:
                text = generate_sample(engine, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.seed + at)
                if log:
                    self.logger.text(at, "sample", text)
        for msg in [f"step {at}: val/loss {loss:.4f}  val/ppl {ppl:.2f}", *(f"warning: {w}" for w in warnings)]:
            self.bar.write(f"[train] {msg}") if self.bar is not None else _log(msg)
        return loss, ppl

    def save(self, at: int) -> None:
        """Checkpoint step ``at`` (tokens seen, sampler, config hash, LR and :meth:`checkpoint_state`); every rank."""
        client = {"tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(), "config_hash": self.chash,
                  "lr": self.cfg.lr}
        client.update(self.checkpoint_state())
        ckpt.save(self.engine, self.ckpt_dir, at, client, self.cfg.keep_last)  # every rank

    def halt(self) -> None:
        """``--halt_after_step``: stop right after that step's checkpoint as if killed.

        Raises:
            TrainingHalted: always.
        """
        raise TrainingHalted(f"halted after step {self.step} (--halt_after_step); resume with --resume auto")

    def export(self) -> Path:
        """The Hugging Face model (and the tokenizer) in ``out_dir/model``, replacing an older one; every rank."""
        model_dir = self.out_dir / "model"
        if self.rank == 0 and model_dir.exists():
            shutil.rmtree(model_dir)
        self.engine.export_hf(model_dir, self.data.tokenizer_dir)  # every rank
        dist.barrier()  # every rank
        return model_dir

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Run every phase: train to ``max_steps`` with evaluation, checkpoints and logs, then export.

        Every rank must call this.

        Raises:
            DSConfigError: a bad DeepSpeed template or batch arithmetic (before anything is written).
            ValueError: too little data for one global batch.
            CheckpointError: a checkpoint that cannot be resumed (e.g. another world size).
            FP16HealthError: the fp16 loss scale hit its minimum, or too many steps overflowed.
            TrainingHalted: after the checkpoint of ``cfg.halt_after_step``.
        """
        t_start = time.time()
        cfg = self.cfg
        self.plan()
        self.prepare_run_dir()
        self.build_engine()
        self.setup()  # every rank
        self.resume()
        self.start_loop()
        engine = self.engine
        engine.train()
        val_loss = val_ppl = float("nan")
        try:
            while self.step < cfg.max_steps:
                arm_watchdog(cfg.watchdog_s)  # restarted every step: covers the step, its evaluation and checkpoint
                loss_acc, extras, lr_now = self.train_step()
                step = self.step
                res = engine.last_step()  # with the deferred overflow check, settled at the next backward
                self.unchecked = (step, res)
                self.nonfinite.record(step, loss_acc)  # on the device: read where the loop synchronises anyway
                self.after_step()  # every rank
                if self.bar is not None:
                    self.bar.update(1)
                halting = bool(cfg.halt_after_step) and step == cfg.halt_after_step and step < cfg.max_steps
                if halting or step == cfg.max_steps or any(
                        step % n == 0 for n in (cfg.log_interval, cfg.eval_interval, cfg.save_interval)):
                    self.check_health()  # a step that logs, evaluates or saves reads its own outcome (one GPU wait)
                    self.nonfinite.check(step, cfg.max_skipped_fraction, self.precision)  # TrainingHealthError
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    self.log_step(res, loss_acc, extras, lr_now)
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_loss, val_ppl = self.evaluate(step)
                    self.t_log = time.perf_counter()
                if step % cfg.save_interval == 0 or step == cfg.max_steps:
                    self.save(step)
                    self.t_log = time.perf_counter()
                if halting:
                    self.halt()
            if math.isnan(val_loss):  # resumed at max_steps: evaluate the final weights once more
                # logged only when the metrics lack it (a re-run of a finished stage adds no second final row)
                val_loss, val_ppl = self.evaluate(
                    self.step, log=not _logged(self.out_dir / "metrics.jsonl", self.step, "val/loss"))
            arm_watchdog(cfg.watchdog_s)
            model_dir = self.export()
        except FP16HealthError as e:
            if self.rank == 0:
                # a checkpoint holds the weights the *next* step runs on: the one before the first bad step made it
                first_bad = min(x for x in (self.monitor.first_skipped(), self.nonfinite.first_bad(self.step),
                                            self.step) if x is not None)
                since = max(first_bad - 1, 1)
                aside = set_aside_unhealthy(self.ckpt_dir, since, str(e).split(". ")[0])
                if aside:
                    _log(f"checkpoints saved since step {since} set aside as not resumable: "
                         f"{', '.join(p.name for p in aside)}")
            raise
        finally:
            disarm_watchdog()
            if self.bar is not None:
                self.bar.close()
            self.logger.close()
        _log(f"{self.stage}: done in {time.time() - t_start:.0f} s; val/loss {val_loss:.4f}; model in {model_dir}")
        return TrainResult(
            val_loss=val_loss, val_ppl=val_ppl, steps=self.step, tokens_seen=self.tokens_seen,
            skipped_steps=engine.skipped_steps, loss_scale=engine.loss_scale(), precision=self.precision,
            precision_note=self.precision_note, world_size=self.world, launcher=self.launcher,
            backend=engine.backend, zero_stage=engine.zero_stage, ds_config_resolved=str(self.resolved_path),
            model_dir=str(model_dir), n_params=self.n_params,
            tokens_per_s=(self.tps_sum / self.tps_n) if self.tps_n else None, mfu=self.last_mfu,
            resumed_from=str(self.resume_path) if self.resume_path else None, history=self.history,
            regime=self.regime.summary(), val_metrics=self.val_metrics, lr_changed_from=self.lr_changed_from)


class SparseTrainer(Trainer):
    """A :class:`Trainer` that keeps pruned weights at zero: ``masks`` (parameter name -> bool tensor, True =
    kept) are applied once the engine exists and again after every optimizer step, in the fp32 master weights,
    Adam's moments and the module's weights (:class:`pipeline.compat.zero_masks.MaskKeeper`, ZeRO stages 0-3).
    With empty ``masks`` it is a plain :class:`Trainer`.  Every rank must pass the same masks."""

    def __init__(self, *args: Any, masks: dict[str, torch.Tensor] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.masks = masks or {}
        self.keeper = None

    def setup(self) -> None:
        super().setup()
        if self.masks:
            from pipeline.compat.zero_masks import MaskKeeper

            self.keeper = MaskKeeper(self.engine, self.masks)  # every rank: its own partition of the fp32 weights
            self.keeper.apply(self.engine)

    def after_step(self) -> None:
        super().after_step()
        if self.keeper is not None:
            self.keeper.apply(self.engine)  # every rank


def run_training(cfg: TrainConfig, model: torch.nn.Module, *, stage: str, out_dir: str | Path,
                 tb_dir: str | Path | None, data: TrainData, loss_fn: LossFn | None = None,
                 eval_fn: Callable[..., tuple[float, dict[str, float]]] | None = None) -> TrainResult:
    """``Trainer(...).fit()``: train ``model`` as ``cfg`` says and export it to ``out_dir/model`` (the arguments
    are :class:`Trainer`'s; :class:`pipeline.horovod_backend.HorovodBackend` has the same signature).  Every rank
    must call this with the same arguments."""
    return Trainer(cfg, model, stage=stage, out_dir=out_dir, tb_dir=tb_dir, data=data, loss_fn=loss_fn,
                   eval_fn=eval_fn).fit()


def config_dict(cfg: TrainConfig) -> dict:
    """The configuration as JSON-able data (for the manifest)."""
    return to_dict(cfg)
