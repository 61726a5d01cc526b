"""Stage 04, knowledge distillation: the KD loss, the frozen teacher, and keeping pruned weights at zero.

:class:`Distiller`, the shared training loop (:class:`pipeline.train.Trainer`) with a teacher, the KD loss and
the masks kept, used by ``scripts/distill.py`` and the ``finetune`` control, is built from three parts:

- :func:`kd_loss` (and :func:`hidden_mse`): the distillation objective of Hinton et al. (2015),
  ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)``, in fp32 from
  fp16/bf16 logits, ignoring masked/padded positions.
- :class:`MaskKeeper` (through :class:`pipeline.train.SparseTrainer`): after every optimizer step, re-zeroes the pruned weights in DeepSpeed's fp32
  master weights, in Adam's ``exp_avg``/``exp_avg_sq``, and in the module's (low-precision) weights,
  for ZeRO stages 0-3, through the fragments that ``deepspeed.utils.safe_*`` read and write (it lives in
  :mod:`pipeline.compat.zero_masks`: it reaches into DeepSpeed's optimizer state).
- :func:`prepare_teacher`: the stage-02 model frozen (``eval()``, no gradients, no optimizer state) in
  the run's dtype on the student's device; under ZeRO-3 partitioned across ranks with DeepSpeed's
  inference-style ZeRO-3 engine instead of being replicated.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal  # noqa: F401 - Literal: see below

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline import dist
from pipeline.compat.zero_masks import (  # MaskKeeper re-exported (tests)
    MaskKeeper,  # noqa: F401
    param_bytes,
)
from pipeline.config import config_hash, doc, legacy_config_hash, to_dict
from pipeline.manifest import StageError, require_stage, stage_dir, write_manifest
from pipeline.model import ModelConfig  # noqa: F401 - pipeline.config resolves inherited hints in this module
from pipeline.sparsity import count_mask_violations, load_export_state_dict  # noqa: F401 (re-exported)
from pipeline.stage_output import StageOutput
from pipeline.train import SparseTrainer, TrainConfig

# ---------------------------------------------------------------------------------------------
# the KD loss


def _kd_chunk_sums(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the rows of one chunk: (sum of per-token KL at temperature T, sum of per-token CE at T=1)."""
    s32 = s.float()
    t32 = t.float()
    if temperature != 1.0:
        log_ps_t = F.log_softmax(s32 / temperature, dim=-1)
        log_pt_t = F.log_softmax(t32 / temperature, dim=-1)
    else:
        log_ps_t = F.log_softmax(s32, dim=-1)
        log_pt_t = F.log_softmax(t32, dim=-1)
    # KL(p_t || p_s) = sum_v p_t (log p_t - log p_s); kl_div takes the *input* (student) in log space.
    kl = F.kl_div(log_ps_t, log_pt_t, reduction="sum", log_target=True)
    ce = F.cross_entropy(s32, y, reduction="sum")
    return kl, ce


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knowledge-distillation loss of a student against a teacher (Hinton, Vinyals & Dean, 2015).

    ``loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, labels)``

    Both terms are means over the positions whose label is not ``ignore_index`` (masked or padded
    positions contribute nothing); KL is summed over the vocabulary per position, CE is at ``T = 1``.
    The ``T²`` factor keeps the soft term's gradient magnitude independent of ``T`` (Hinton et al.,
    2015, §2). Everything is computed in fp32 whatever the logits' dtype (fp16/bf16/fp32).

    Memory: only the valid positions are kept, and they are processed ``chunk_size`` tokens at a time;
    when gradients are needed each chunk runs under activation checkpointing, so the fp32 vocabulary-
    wide intermediates exist for one chunk at a time (recomputed in backward) instead of for every token.

    Args:
        student_logits: ``(..., V)`` logits of the student (requires grad in training).
        teacher_logits: ``(..., V)`` logits of the teacher, same shape; treated as constants (detached).
        labels: ``(...)`` integer next-token targets aligned with the logits (position ``i`` of the logits
            predicts ``labels[i]``; shift before calling), ``ignore_index`` where masked or padded.
        temperature: softmax temperature ``T > 0`` of the KL term.
        alpha: weight in ``[0, 1]`` of the KL term; ``1 − alpha`` weighs the CE term.
        ignore_index: label value of positions to ignore.
        chunk_size: tokens per chunk (``None``: all valid tokens at once).

    Returns:
        ``(loss, kl, ce)``: fp32 scalars; ``loss`` carries the gradient, ``kl`` and ``ce`` are detached
        (for logging; ``kl`` is without the ``T²`` factor). When every position is ignored all three
        are 0 and ``loss`` is still connected to ``student_logits`` (its gradient is zero).

    Raises:
        ValueError: on mismatched shapes, ``temperature <= 0``, ``alpha`` outside ``[0, 1]`` or
            ``chunk_size < 1``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: teacher and student must share the tokenizer (same vocabulary) and the batch"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' shape without the vocabulary "
                         f"dimension, {tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    vocab = student_logits.size(-1)
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    y = labels.reshape(-1)
    valid = y != ignore_index
    n = int(valid.sum())
    if n == 0:
        zero = student_logits.float().sum() * 0.0  # keeps the graph: backward gives zero gradients
        return zero, zero.detach(), zero.detach()
    if n < y.numel():
        idx = valid.nonzero().squeeze(1)
        s, t, y = s.index_select(0, idx), t.index_select(0, idx), y.index_select(0, idx)
    step = n if chunk_size is None else chunk_size
    use_ckpt = torch.is_grad_enabled() and s.requires_grad
    kl_sum = s.new_zeros((), dtype=torch.float32)
    ce_sum = s.new_zeros((), dtype=torch.float32)
    for a in range(0, n, step):
        args = (s[a : a + step], t[a : a + step], y[a : a + step], float(temperature))
        if use_ckpt:
            kl_c, ce_c = checkpoint(_kd_chunk_sums, *args, use_reentrant=False)
        else:
            kl_c, ce_c = _kd_chunk_sums(*args)
        kl_sum = kl_sum + kl_c
        ce_sum = ce_sum + ce_c
    kl = kl_sum / n
    ce = ce_sum / n
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, kl.detach(), ce.detach()


def hidden_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between matching hidden states of student and teacher, in fp32.

    The mean is over layers, valid positions and features (as in DistilBERT's cosine/MSE hidden-state
    terms, Sanh et al., 2019, and TinyBERT's layer MSE, Jiao et al., 2020).

    Args:
        student_hidden: per layer a ``(B, T, d)`` tensor (e.g. ``outputs.hidden_states[1:]``).
        teacher_hidden: as many ``(B, T, d)`` tensors (detached), same widths.
        valid: optional ``(B, T)`` bool tensor, True where the position counts.

    Returns:
        An fp32 scalar (0, still connected to the graph, when no position is valid).

    Raises:
        ValueError: when the layer counts or the shapes differ (a structured student of another width
            needs a projection; turn the term off with ``hidden_mse_weight 0``).
    """
    if len(student_hidden) != len(teacher_hidden) or len(student_hidden) == 0:
        raise ValueError(f"hidden-state MSE needs as many student as teacher layers, got {len(student_hidden)} "
                         f"and {len(teacher_hidden)}; set hidden_mse_weight 0")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden states differ in shape (student {tuple(hs.shape)}, teacher {tuple(ht.shape)}): "
                             "widths differ, so the hidden-state MSE term is undefined; set hidden_mse_weight 0")
        d = (hs.float() - ht.detach().float()).pow(2)
        if valid is not None:
            n = int(valid.sum())
            if n == 0:
                return hs.float().sum() * 0.0
            d = d[valid]
        total = total + d.mean()
    return total / len(student_hidden)


# ---------------------------------------------------------------------------------------------
# keeping pruned weights at zero under DeepSpeed


# ---------------------------------------------------------------------------------------------
# the teacher


class Teacher:
    """The frozen teacher: a ``transformers`` causal LM in eval mode, no gradients, no optimizer state.

    Under ZeRO-3 its weights are partitioned across the ranks by a DeepSpeed engine built without an
    optimizer (DeepSpeed's "ZeRO-3 inference": ``deepspeed.initialize(model=…)`` with a stage-3 config and
    no ``optimizer`` section gives a ``DeepSpeedZeRoOffload`` that gathers each layer's weights for its
    forward and frees them after), so each rank holds ``1/world_size`` of it instead of all of it.
    Build it with :func:`prepare_teacher`.

    Attributes:
        module: the model (its parameters are partitioned under ZeRO-3).
        engine: the DeepSpeed inference engine under ZeRO-3, else ``None``.
        dtype: the run's dtype the weights are kept in.
        param_bytes_full: bytes of all its parameters in ``dtype`` (what every rank holds when replicated).
        param_bytes_per_rank: bytes of parameters this rank keeps between forwards, measured after
            one forward (under ZeRO-3: its partitions plus the small parameters kept gathered, see
            ``stage3_param_persistence_threshold``). Update with :meth:`measure`.
    """

    def __init__(self, module: torch.nn.Module, engine: Any, dtype: torch.dtype,
                 param_bytes_full: int, param_bytes_per_rank: int):
        self.module = module
        self.engine = engine
        self.dtype = dtype
        self.param_bytes_full = param_bytes_full
        self.param_bytes_per_rank = param_bytes_per_rank

    @property
    def config(self) -> Any:
        return self.module.config

    def measure(self) -> int:
        """Re-measure :attr:`param_bytes_per_rank` (call after a forward); returns it."""
        self.param_bytes_per_rank = param_bytes(self.module, local=True)
        return self.param_bytes_per_rank

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The model's outputs (``.logits`` of shape ``(B, T, V)`` in ``dtype``) without autograd.

        Under ZeRO-3 every rank must call it with a batch (the layers' weights are gathered collectively).
        """
        return self.module(input_ids=input_ids, **kwargs)


def prepare_teacher(model_dir: str | Any, dtype: torch.dtype, device: torch.device | str, zero_stage: int,
                    micro_batch_size: int = 1, zero3_config: dict | None = None) -> Teacher:
    """Load the stage-02 model as a frozen teacher in the run's dtype on the student's device.

    ``eval()`` (no dropout), every parameter ``requires_grad=False``, never given to an optimizer.
    For ``zero_stage == 3`` it is wrapped in a DeepSpeed ZeRO-3 engine without optimizer (partitioned
    like the student); otherwise a full copy sits on each rank's device.

    Args:
        model_dir: a Hugging Face model directory (or an already built ``PreTrainedModel``).
        dtype: the run's compute dtype (``torch.float16``/``bfloat16``/``float32``).
        device: the student's device.
        zero_stage: the student's ZeRO stage.
        micro_batch_size: batch size DeepSpeed's config is told (no effect on the teacher's results).
        zero3_config: extra ``zero_optimization`` keys for the teacher's ZeRO-3 engine (e.g. offload).

    Returns:
        A :class:`Teacher`. Under ZeRO-3 every rank must call this (``deepspeed.initialize`` is collective).

    Raises:
        OSError: from ``from_pretrained`` when the directory holds no model.
    """
    if isinstance(model_dir, torch.nn.Module):
        model = model_dir.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        from pipeline.compat.hf import without_hf_zero3

        # built whole on every rank whatever the launcher; ZeRO-3 partitions it in deepspeed.initialize below
        with without_hf_zero3():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    full = param_bytes(model, local=False)
    engine = None
    if zero_stage == 3:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, **(zero3_config or {})},
            "fp16": {"enabled": dtype == torch.float16},
            "bf16": {"enabled": dtype == torch.bfloat16},
        }
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)  # collective; no optimizer
        model = engine.module
        model.eval()
    else:
        model.to(device)
    return Teacher(model, engine, dtype, full, param_bytes(model, local=True))



# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class DistillConfig(TrainConfig):
    """Stage 04 settings (preset section ``distill``): the training loop's settings plus the KD objective.

    The student is the stage-03 model (``results/<run>/03_prune/model`` and its ``masks.safetensors``), the
    teacher the stage-02 model; the ``model.*`` and ``init_from`` fields of the training loop are not used.
    """

    compile: Literal["auto", "on", "off"] = doc(
        "torch.compile the student (see pretrain's --compile); off by default here: its effect under the teacher's "
        "forward and the chunked KD loss has not been measured.", "off", run_control=True)
    alpha: float = doc("Weight of the soft (KL) term; 1 - alpha weighs the hard-label cross-entropy.", 0.5)
    temperature: float = doc("Softmax temperature T of the KL term (the term is scaled by T^2, Hinton et al. 2015).",
                             2.0)
    hidden_mse_weight: float = doc("Weight of an extra MSE between the student's and teacher's hidden states "
                                   "(0: off; needs equal widths and layer counts, so not for 'structured' students).",
                                   0.0)
    kd_chunk_size: int = doc("Tokens per chunk of the fp32 KD loss (bounds its vocabulary-wide memory; 0: one chunk).",
                             4096)

    def validate(self) -> list[str]:
        p = super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0, got {self.temperature}")
        if self.hidden_mse_weight < 0:
            p.append(f"hidden_mse_weight must be >= 0, got {self.hidden_mse_weight}")
        if self.kd_chunk_size < 0:
            p.append(f"kd_chunk_size must be >= 0, got {self.kd_chunk_size}")
        if self.init_from:
            p.append("init_from is not used by distill (the student is the stage-03 model); leave it empty")
        return p


class Distiller(SparseTrainer):
    """Stage 04's :class:`~pipeline.train.Trainer`: knowledge distillation of a frozen teacher into a (pruned)
    student whose masks stay at zero (after torchtune's KD recipe, ``knowledge_distillation_single_device``).

    Over :class:`~pipeline.train.SparseTrainer` it changes three phases:

    - :meth:`setup`: the teacher (:func:`prepare_teacher`: the run's dtype on the student's device, under ZeRO-3
      partitioned like the student) and, on a fresh start, the reference figures logged at step 0 (teacher and
      student validation loss and perplexity right after pruning);
    - :meth:`loss`: :func:`kd_loss` (plus :func:`hidden_mse` with ``hidden_mse_weight > 0``); with ``alpha 0``
      and no hidden-state term the cross-entropy alone, the teacher not run;
    - :meth:`checkpoint_state` / :meth:`restore_state`: the reference figures travel with each checkpoint.

    Args:
        cfg: a :class:`DistillConfig`.
        student: the stage-03 model in fp32 on CPU.
        teacher_dir: the stage-02 model directory (or a built model).
        masks: the stage-03 masks (``{}`` for a structured student).
        pruned_val_ppl: stage 03's fp32 validation perplexity of the student (named in the step-0 message).
        **kwargs: :class:`~pipeline.train.Trainer`'s ``stage``, ``out_dir``, ``tb_dir``, ``data``.
    """

    def __init__(self, cfg: DistillConfig, student: torch.nn.Module, *, teacher_dir: str | Path | Any,
                 masks: dict[str, torch.Tensor], pruned_val_ppl: float | None = None, **kwargs: Any):
        super().__init__(cfg, student, masks=masks, **kwargs)
        self.teacher_dir = teacher_dir
        self.pruned_val_ppl = pruned_val_ppl
        self.teacher: Teacher | None = None
        self.ref: dict[str, float] = {}

    def setup(self) -> None:  # every rank
        engine, cfg = self.engine, self.cfg
        extra = {k: v for k, v in engine.config.get("zero_optimization", {}).items() if k in _TEACHER_ZERO3_KEYS}
        self.teacher = prepare_teacher(self.teacher_dir, engine.dtype, engine.device, engine.zero_stage,
                                       cfg.micro_batch_size, zero3_config=extra)
        super().setup()  # the masks
        if self.resume_path is not None:
            return  # the reference figures come back from the checkpoint (restore_state)
        from pipeline.train import evaluate

        eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
        world, rank, val = self.world, self.rank, self.data.val
        t_loss, t_ppl, _ = evaluate(self.teacher.module, val, eval_bs, engine.device, world, rank)  # every rank
        self.teacher.measure()
        s_loss, s_ppl, _ = evaluate(engine.ds, val, eval_bs, engine.device, world, rank)  # every rank
        self.ref = {"teacher_val_loss": t_loss, "teacher_val_ppl": t_ppl,
                    "student_val_loss_before": s_loss, "student_val_ppl_before": s_ppl}
        from pipeline.metrics import MetricsLogger

        with MetricsLogger(self.out_dir / "metrics.jsonl", self.tb_dir) as log:  # rank 0 writes
            log.log(0, {"kd/teacher_val_loss": t_loss, "kd/teacher_val_ppl": t_ppl, "val/loss": s_loss,
                        "val/ppl": s_ppl})
        if dist.is_rank0():
            prec = str(engine.dtype).replace("torch.", "")
            pruned_fp32 = self.pruned_val_ppl
            same = (f"; stage 03 measured {pruned_fp32:.2f} in float32: a difference is the {prec} evaluation"
                    if pruned_fp32 is not None and prec != "float32" else "")
            print(f"[{self.stage}] teacher val/ppl {t_ppl:.2f}; student right after pruning val/ppl {s_ppl:.2f} (in "
                  f"{prec}, as training evaluates{same})", flush=True)

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The KD loss of one micro-batch ``(B, T + 1)`` of token ids (inputs ``batch[:, :-1]``, targets
        ``batch[:, 1:]``) and its terms to log: ``kd/loss``, ``kd/kl`` (without T²), ``kd/ce`` and, with
        ``hidden_mse_weight > 0``, ``kd/hidden_mse``.  With ``alpha 0`` and no hidden-state term the loss is the
        cross-entropy alone and the teacher is not run (``kd/kl`` is then not logged).  Every rank calls it for
        every micro-batch (under ZeRO-3 the teacher's forward is collective)."""
        cfg, engine = self.cfg, self.engine
        hidden = cfg.hidden_mse_weight > 0
        x, y = batch[:, :-1], batch[:, 1:]
        if cfg.alpha == 0.0 and not hidden:  # cross-entropy only: the teacher's logits would be weighted 0
            from pipeline.train import token_cross_entropy

            ce = token_cross_entropy(engine(input_ids=x, use_cache=False).logits, y)
            return ce, {"kd/ce": ce.detach(), "kd/loss": ce.detach()}
        t_out = self.teacher(x, use_cache=False, output_hidden_states=hidden)
        s_out = engine(input_ids=x, use_cache=False, output_hidden_states=hidden)
        loss, kl, ce = kd_loss(s_out.logits, t_out.logits, y, cfg.temperature, cfg.alpha,
                               chunk_size=cfg.kd_chunk_size or None)
        metrics = {"kd/kl": kl, "kd/ce": ce}
        if hidden:
            h = hidden_mse(s_out.hidden_states[1:], t_out.hidden_states[1:], y != -100)
            loss = loss + cfg.hidden_mse_weight * h
            metrics["kd/hidden_mse"] = h.detach()
        metrics["kd/loss"] = loss.detach()
        return loss, metrics

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "distill_ref": self.ref}

    def restore_state(self, client: dict) -> None:
        super().restore_state(client)
        self.ref = dict(client.get("distill_ref", {}))


#: what this stage's config hash left out before the run-control fields were marked on the dataclass (it lacked
#: compile, foreach_checks, defer_overflow and watchdog_s): an output made then is accepted as this run's
_LEGACY_HASH_IGNORE = ("overwrite", "resume", "halt_after_step", "progress")

_TEACHER_ZERO3_KEYS = ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                       "stage3_max_live_parameters", "stage3_max_reuse_distance", "offload_param")


def distill(cfg: DistillConfig, *, out_dir: str | Path | None = None, stage: str = "distill",
            tb_name: str = "distill", extra_outputs: dict | None = None) -> dict | None:
    """Run stage 04: distil the stage-02 teacher into the stage-03 student through the shared training loop.

    The keyword arguments let a control reuse the stage unchanged (``pipeline.controls``' ``finetune``: the same
    recipe with ``alpha 0``): ``out_dir`` instead of ``04_distill``, ``stage`` in messages and the manifest,
    TensorBoard under ``tb/<tb_name>``, and ``extra_outputs`` added to the manifest's outputs.

    Reads ``01_data`` (tokens, tokenizer), ``02_pretrain`` (teacher) and ``03_prune`` (student and masks);
    writes ``04_distill/`` with ``model/`` (the export, tokenizer beside it), ``masks.safetensors`` (a copy of
    the student's masks), ``metrics.jsonl``, ``ds_config.resolved.json``, ``checkpoints/`` and, last,
    ``manifest.json``; TensorBoard goes to ``results/<run>/tb/distill``. Every rank must call it; only rank 0
    writes files.

    Logged: ``kd/loss``, ``kd/kl``, ``kd/ce`` (training), ``val/loss`` and ``val/ppl`` (the student, at step 0
    right after pruning and at every evaluation), ``kd/teacher_val_loss``/``kd/teacher_val_ppl`` once at step 0.

    Returns:
        The manifest on rank 0, ``None`` elsewhere.

    Raises:
        StageError: a missing upstream stage, teacher and student that do not fit together, masks that do
            not fit the student, or an export whose pruned weights are not all zero (no manifest is written).
    """
    from pipeline.budget import budget_of, training_budget
    from pipeline.engine import device_type
    from pipeline.train import TrainData

    t0 = time.time()
    run_dir = cfg.run_dir()
    data_m = require_stage(run_dir, "data", cfg.run, cfg.preset)
    pre_m = require_stage(run_dir, "pretrain", cfg.run, cfg.preset)
    prune_m = require_stage(run_dir, "prune", cfg.run, cfg.preset)
    out_dir = Path(out_dir) if out_dir is not None else stage_dir(run_dir, "distill")
    teacher_dir = Path(pre_m["_dir"]) / pre_m["outputs"]["model_dir"]
    student_dir = Path(prune_m["_dir"]) / prune_m["outputs"]["model_dir"]
    method = prune_m["outputs"].get("method")
    masks_rel = prune_m["outputs"].get("masks")
    masks_path = Path(prune_m["_dir"]) / masks_rel if masks_rel else None

    # -- every check before anything is written ------------------------------------------------
    from transformers import AutoConfig

    problems = []
    for what, d, target in (("teacher", teacher_dir, "pretrain"), ("student", student_dir, "prune")):
        if not (d / "config.json").is_file():
            problems.append(f"the {what} model directory {d} has no config.json; re-run `make {target} RUN={cfg.run}`")
    if problems:
        raise StageError("; ".join(problems))
    from pipeline.manifest import check_same_tokenizer

    check_same_tokenizer({"stage-01": Path(data_m["_dir"]) / data_m["outputs"]["tokenizer_dir"],
                          "teacher": teacher_dir, "student": student_dir},
                         f"re-run `make pretrain prune RUN={cfg.run}` so that both come from this run's stage 01")
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(student_dir)
    vocab = int(data_m["outputs"]["vocab_size"])
    if t_cfg.vocab_size != s_cfg.vocab_size or s_cfg.vocab_size < vocab:
        raise StageError(f"teacher vocabulary {t_cfg.vocab_size}, student {s_cfg.vocab_size}, tokenizer {vocab}: "
                         f"they must share the stage-01 tokenizer; re-run `make prune` from this run's pretrain")
    if cfg.hidden_mse_weight > 0 and (t_cfg.hidden_size != s_cfg.hidden_size
                                      or t_cfg.num_hidden_layers != s_cfg.num_hidden_layers):
        raise StageError(f"hidden_mse_weight {cfg.hidden_mse_weight} needs equal widths and depths, but the teacher is "
                         f"{t_cfg.num_hidden_layers}x{t_cfg.hidden_size} and the ({method}) student "
                         f"{s_cfg.num_hidden_layers}x{s_cfg.hidden_size}; pass --hidden_mse_weight 0")
    from pipeline.integrity import ModelFileError, UnsafeFileError, load_causal_lm

    try:
        student = load_causal_lm(student_dir, dtype=torch.float32, attn_implementation="sdpa")
    except (ModelFileError, UnsafeFileError) as e:
        raise StageError(str(e)) from None
    from pipeline.sparsity import load_masks

    try:
        masks = load_masks(masks_path) if masks_path is not None else {}
    except FileNotFoundError as e:
        raise StageError(f"{e}: stage 03 lists it; re-run `make prune RUN={cfg.run}`") from None
    from pipeline.prune_methods import writes_masks

    if writes_masks(method) and not masks:
        raise StageError(f"stage 03 ({method}) lists no masks; re-run `make prune RUN={cfg.run}`")
    if masks:
        sd = student.state_dict()
        try:
            revived = count_mask_violations(sd, masks)
        except ValueError as e:
            raise StageError(f"{masks_path} does not fit the student in {student_dir}: {e}; "
                             f"re-run `make prune RUN={cfg.run}`") from None
        if sum(revived.values()):
            raise StageError(f"the stage-03 student has {sum(revived.values())} nonzero weights where its masks say "
                             f"pruned; re-run `make prune RUN={cfg.run}`")
    chash = config_hash(cfg)
    same_run = (chash, legacy_config_hash(cfg, _LEGACY_HASH_IGNORE))
    StageOutput(out_dir).check(chash, cfg.overwrite, stage, also_accept=same_run[1:])
    data = TrainData.from_manifest(data_m)
    if cfg.overwrite and (out_dir / "manifest.json").exists():
        from pipeline.manifest import read_manifest

        if read_manifest(out_dir).get("outputs", {}).get("config_hash") not in same_run:
            # replacing another configuration's output: its checkpoints are not this run's to resume
            cfg = dataclasses.replace(cfg, resume="none")
    tb_dir = cfg.tb_root() / tb_name
    from pipeline.checkpoint import CheckpointError
    from pipeline.engine import FP16HealthError

    trainer = Distiller(cfg, student, teacher_dir=teacher_dir, masks=masks,
                        pruned_val_ppl=prune_m.get("metrics", {}).get("val_ppl"),
                        stage=stage, out_dir=out_dir, tb_dir=tb_dir, data=data)
    t_train = time.time()
    try:
        result = trainer.fit()
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    t_train = time.time() - t_train
    teacher = trainer.teacher
    teacher.measure()  # after training: under ZeRO-3 the persistent small parameters are gathered by now

    if not dist.is_rank0():
        return None
    # -- sparsity is a fact about the exported weights -----------------------------------------
    export = Path(result.model_dir)
    outputs: dict[str, Any] = {"model_dir": "model", "config_hash": chash, "method": method,
                               "teacher_dir": str(teacher_dir), "student_dir": str(student_dir), "masks": None}
    if masks:
        sd = load_export_state_dict(export)
        bad = {k: v for k, v in count_mask_violations(sd, masks).items() if v}
        if bad:
            raise StageError(f"the export {export} has nonzero weights where the masks say pruned ({bad}); "
                             "no manifest written. This is a bug in mask keeping: please report it")
        pruned = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((sd[k] == 0).sum()) for k in masks)
        shutil.copyfile(masks_path, out_dir / "masks.safetensors")
        outputs.update(masks="masks.safetensors", mask_violations=0, sparsity=pruned / total,
                       export_zero_fraction=zeros / total, sparsity_checked=True)
    outputs.update(teacher_partitioned=teacher.engine is not None, teacher_param_bytes_full=teacher.param_bytes_full,
                   teacher_param_bytes_per_rank=teacher.param_bytes_per_rank)
    metrics = {"val_loss": result.val_loss, "val_ppl": result.val_ppl, **trainer.ref, "steps": result.steps,
               "tokens_seen": result.tokens_seen, "skipped_steps": result.skipped_steps,
               "loss_scale": result.loss_scale, "tokens_per_s": result.tokens_per_s, "mfu": result.mfu,
               "precision": result.precision, "precision_note": result.precision_note, "zero_stage": result.zero_stage,
               "world_size": result.world_size, "launcher": result.launcher, "backend": result.backend,
               "resumed_from": result.resumed_from, "lr_changed_from": result.lr_changed_from,
               "history": result.history,
               # what the student cost, the teacher's pretraining included (pipeline.budget), and its data regime
               "budget": training_budget(result.steps, result.tokens_seen, t_train, result.world_size, device_type(),
                                         parent=budget_of(pre_m), parent_name="pretrain"),
               "regime": result.regime}
    outputs.update(extra_outputs or {})
    config = to_dict(cfg)
    # the student's shape comes from stage 03, not from the (pretraining) model fields of this config
    config["model"] = {"from": str(student_dir), "hidden_size": s_cfg.hidden_size,
                       "num_hidden_layers": s_cfg.num_hidden_layers,
                       "num_attention_heads": getattr(s_cfg, "num_attention_heads", None),
                       "intermediate_size": getattr(s_cfg, "intermediate_size", None)}
    return write_manifest(out_dir, stage, config, outputs, metrics,
                          inputs={"data": data_m["_dir"], "pretrain": pre_m["_dir"], "prune": prune_m["_dir"]},
                          seed=cfg.seed, wall_time_s=time.time() - t0)
