"""Horovod data parallelism for the classification stage (``--backend horovod``, under ``horovodrun``).

    horovodrun -np 2 -H localhost:2 --gloo python scripts/classify.py --run NAME --preset encoder-tiny --backend horovod
    make classify TASK=classify LAUNCHER=horovod NGPU=2

Everything but the training loop is :mod:`pipeline.classify`'s: data, split by play, model, loss, LR schedule
(:class:`pipeline.train.WarmupCosine`), data order (:class:`pipeline.sampler.GlobalBatchSampler`), the distributed
evaluation (:func:`pipeline.classify.predict`, gathering with ``hvd.allgather``) and the stage's outputs and
manifest.  The loop is plain PyTorch in fp32: AdamW with the DeepSpeed engine's parameter groups
(:func:`pipeline.engine.param_groups`) inside ``hvd.DistributedOptimizer``, which averages the gradients of the
ranks (Gloo on CPU), then global-norm clipping and the step, as in Horovod's PyTorch guide
(https://horovod.readthedocs.io/en/stable/pytorch.html).  Parameters and optimizer state are broadcast from
rank 0 before the first step; rank and world size come from ``hvd.rank()``/``hvd.size()`` and are exported as
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, so :mod:`pipeline.dist` (only rank 0 writes) holds.

Not on this path: ZeRO, fp16/bf16, torch.compile, checkpoints and resume.  Horovod is an optional dependency
(:data:`INSTALL`; the README's "Horovod" paragraph says why the two build settings are needed).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.manifest import StageError

#: how Horovod 0.28.1 builds against torch 2.13 (CMake < 4 for its bundled Gloo, every target in C++17): the
#: script sets both and runs ``pip install --no-build-isolation horovod==0.28.1`` with PyTorch and Gloo on
INSTALL = "scripts/install_horovod.sh .venv   (or HOROVOD_CMAKE=/path/to/cmake-3 scripts/install_horovod.sh VENV)"


def require_horovod() -> Any:
    """``horovod.torch``, imported.

    Raises:
        StageError: Horovod or its PyTorch extension is not importable; the message names the install command.
    """
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise StageError(
            f"--backend horovod needs Horovod with its PyTorch extension, which cannot be imported here ({e}). "
            f"Install it with: {INSTALL} (README, 'Horovod'), or use the DeepSpeed backend (--backend deepspeed)"
        ) from None
    return hvd


def launched_by_horovodrun() -> bool:
    """True in a process that ``horovodrun`` started (it exports ``HOROVOD_RANK``)."""
    return "HOROVOD_RANK" in os.environ


def check_config(cfg: Any) -> None:
    """Refuse settings this path does not honour, before anything is written.

    Raises:
        StageError: ``--precision`` fp16/bf16, or ``--resume`` naming a checkpoint (no checkpoints here).
    """
    if cfg.precision not in ("auto", "fp32"):
        raise StageError(f"--backend horovod trains in fp32 (plain PyTorch), not --precision {cfg.precision}; pass "
                         f"--precision fp32, or use --backend deepspeed for fp16/bf16")
    if cfg.resume not in ("auto", "none"):
        raise StageError(f"--backend horovod saves no checkpoints, so it cannot resume '{cfg.resume}'; pass --resume "
                         f"none, or use --backend deepspeed")


class HorovodBackend:
    """Horovod's ranks and collectives, and the classification stage's training loop on them.

    Construction calls ``hvd.init()`` (every rank must construct one) and exports the rank variables.

    Raises:
        StageError: see :func:`require_horovod` and :func:`check_config`.
    """

    def __init__(self, cfg: Any):
        check_config(cfg)
        hvd = require_horovod()
        hvd.init()  # every rank
        self.hvd = hvd
        self.world, self.rank, self.local_rank = hvd.size(), hvd.rank(), hvd.local_rank()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK=str(self.local_rank))
        dist.record_launcher("horovodrun" if launched_by_horovodrun() else "python")

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' ``t`` concatenated along dim 0 (``hvd.allgather``).  Every rank must call it."""
        return self.hvd.allgather(t)  # collective: every rank

    def barrier(self) -> None:
        """Wait for every rank (``hvd.barrier``).  Every rank must call it."""
        self.hvd.barrier()  # collective: every rank

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Average)  # collective: every rank

    def run_training(self, cfg: Any, model: torch.nn.Module, stage: str, out_dir: str | Path, tb_dir: Path | None,
                     data: Any, loss_fn: Any, eval_fn: Any) -> Any:
        """Train ``model`` data-parallel over Horovod's ranks; the arguments and result are those of
        :func:`pipeline.train.run_training` (``zero_stage`` ``None``, no DeepSpeed config, no checkpoint).

        Each optimizer step takes the next global batch of ``micro_batch_size x grad_accum x world`` samples;
        each micro-batch's loss is divided by ``grad_accum`` (as DeepSpeed does), ``hvd.DistributedOptimizer``
        averages the accumulated gradients over the ranks, then the global L2 norm is clipped to ``grad_clip``.
        Validation (``eval_fn``) every ``eval_interval`` steps and at the end; the Hugging Face export is written
        by rank 0 to ``out_dir/model``.  Every rank must call this.
        """
        from tqdm import tqdm
        from transformers import AutoTokenizer

        from pipeline.classify import eval_device
        from pipeline.engine import param_groups
        from pipeline.metrics import MetricsLogger
        from pipeline.model import count_params
        from pipeline.regime import RegimeTracker
        from pipeline.sampler import GlobalBatchSampler
        from pipeline.train import TrainResult, WarmupCosine

        hvd, world, rank = self.hvd, self.world, self.rank
        t_start = time.time()
        out_dir = Path(out_dir)
        device = eval_device()
        note = None if cfg.precision == "fp32" else "--precision auto: the Horovod backend trains in fp32"
        sampler = GlobalBatchSampler(len(data.train), cfg.micro_batch_size, cfg.grad_accum, world, rank, cfg.seed,
                                     world_source=f"hvd.size() = {world} (horovodrun -np)")
        if len(data.val) < 1:
            raise ValueError("the validation split is empty; give more groups or a larger --val_fraction")
        # -- from here on files are written (a fresh start: no resume on this path) ------------------------
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "manifest.json").unlink(missing_ok=True)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # another backend's, not this run's
            if tb_dir is not None:
                shutil.rmtree(tb_dir, ignore_errors=True)
            print(f"[train] {stage}: launcher {dist.launcher()}, Horovod world size {world}, device {device.type}, "
                  f"precision fp32, hvd.DistributedOptimizer (AdamW)", flush=True)
        model.to(device).train()
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                eps=cfg.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup_steps, cfg.max_steps,
                                                                    cfg.min_lr_ratio))
        # AdamW's state as its first step would create it, so that hvd.broadcast_optimizer_state has state to send
        # and does not make it by an optimizer step on zero gradients (which would apply weight decay and count
        # an Adam step)
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # collective: every rank
        hvd.broadcast_optimizer_state(opt, root_rank=0)  # collective: every rank
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       backward_passes_per_step=cfg.grad_accum, op=hvd.Average)

        n_params = count_params(model)
        regime = RegimeTracker(n_params, len(data.train) * data.seq_len)
        logger = MetricsLogger(out_dir / "metrics.jsonl", tb_dir)
        global_tokens = sampler.global_batch * data.seq_len
        eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
        history: dict[str, list] = {"step": [], "loss": [], "loss_scale": [], "skipped": []}
        val_metrics: dict[str, float] = {}
        val_loss = val_ppl = float("nan")
        bar = tqdm(total=cfg.max_steps, desc=stage, unit="step", dynamic_ncols=True) if cfg.progress and rank == 0 \
            else None
        step = tokens_seen = steps_since_log = tps_n = 0
        tps_sum, t_log = 0.0, time.perf_counter()
        try:
            while step < cfg.max_steps:
                lr_now = sched.get_last_lr()[0]
                loss_acc = torch.zeros((), device=device)
                extras: dict[str, torch.Tensor] = {}
                for idx in sampler.next_step():
                    batch = torch.stack([data.train[i] for i in idx]).to(device)
                    loss, extra = loss_fn(model, batch)
                    (loss / cfg.grad_accum).backward()  # the grad_accum-th backward starts the all-reduce
                    loss_acc += loss.detach().float()
                    for k, v in extra.items():
                        extras[k] = extras.get(k, torch.zeros((), device=device)) + torch.as_tensor(v).detach()
                opt.synchronize()  # collective: every rank; the gradients are now the ranks' mean
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                with opt.skip_synchronize():
                    opt.step()
                sched.step()
                opt.zero_grad()  # Horovod 0.28 takes no set_to_none (torch defaults to True)
                step += 1
                tokens_seen += global_tokens
                steps_since_log += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    vals = self._mean(torch.stack([loss_acc, *extras.values()]) / cfg.grad_accum)  # every rank
                    now = time.perf_counter()
                    tps = global_tokens * steps_since_log / max(now - t_log, 1e-9)
                    row = {"train/loss": vals[0].item(), "train/lr": lr_now, "train/grad_norm": float(grad_norm),
                           "train/tokens_per_s": tps, **{k: v.item() for k, v in zip(extras, vals[1:])}}
                    logger.log(step, row)
                    history["step"].append(step)
                    history["loss"].append(row["train/loss"])
                    history["loss_scale"].append(1.0)
                    history["skipped"].append(0)
                    if step > cfg.log_interval:  # the first interval holds start-up costs
                        tps_sum, tps_n = tps_sum + tps, tps_n + 1
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{lr_now:.2e}")
                    t_log, steps_since_log = time.perf_counter(), 0
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    val_loss, extra = eval_fn(model, data.val, eval_bs, device, world, rank)  # every rank
                    val_ppl = math.exp(min(val_loss, 700.0))
                    val_metrics = dict(extra)
                    scalars, warnings = regime.at_eval(step, tokens_seen, val_loss, history)
                    logger.log(step, {"val/loss": val_loss, **extra})
                    logger.log(step, scalars)
                    if rank == 0:
                        for msg in [f"step {step}: val/loss {val_loss:.4f}", *(f"warning: {w}" for w in warnings)]:
                            bar.write(f"[train] {msg}") if bar is not None else print(f"[train] {msg}", flush=True)
                    t_log = time.perf_counter()
            model_dir = out_dir / "model"
            if rank == 0:
                shutil.rmtree(model_dir, ignore_errors=True)
                model.save_pretrained(model_dir, safe_serialization=True)
                AutoTokenizer.from_pretrained(data.tokenizer_dir).save_pretrained(model_dir)
            self.barrier()  # every rank: the export is complete before any rank reads it
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if rank == 0:
            print(f"[train] {stage}: done in {time.time() - t_start:.0f} s; val/loss {val_loss:.4f}; model in "
                  f"{model_dir}", flush=True)
        return TrainResult(
            val_loss=val_loss, val_ppl=val_ppl, steps=step, tokens_seen=tokens_seen, skipped_steps=0, loss_scale=1.0,
            precision="fp32", precision_note=note, world_size=world, launcher=dist.launcher(), backend="horovod",
            zero_stage=None, ds_config_resolved="", model_dir=str(model_dir), n_params=n_params,
            tokens_per_s=(tps_sum / tps_n) if tps_n else None, mfu=None, resumed_from=None, history=history,
            regime=regime.summary(), val_metrics=val_metrics)
