"""The encoder path's stages 03-05: compress the fine-tuned classifier, distil it from the dense one, measure both.

- **03 prune** (:func:`prune_classifier`): ``magnitude`` (unstructured by ``|w|``) and ``nm`` (2:4 by default)
  keep-masks over the linear weights of the encoder blocks (:func:`pipeline.sparsity.compute_masks`: query,
  key, value, attention output, intermediate and output projections; embeddings, pooler and classifier
  stay dense); ``structured`` removes MLP intermediate channels of every block (the same number in each,
  ranked by the squared L2 norm of a channel's input row plus output column, the group magnitude of
  torch-pruning's ``GroupMagnitudeImportance(p=2)``), giving a smaller plain ``BertForSequenceClassification``
  with ``intermediate_size`` in its config.  Attention heads are refused for BERT: ``BertConfig`` derives the
  head size from ``hidden_size / num_attention_heads``, so a model with fewer heads of the old size cannot be
  described by its config and would not reload.
- **04 distill** (:func:`distill_classifier`): the pruned student learns from the fine-tuned teacher's logits
  as DistilBERT did (Sanh et al., 2019; Hinton et al., 2015): ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T))
  + (1 - alpha) · CE(s, y)``, through :class:`ClassifierDistiller` (the shared :class:`pipeline.train.Trainer` with the pruning masks kept at
  zero, :class:`pipeline.train.SparseTrainer`).  ``--alpha 0`` is the no-teacher control (fine-tuning only).
- **05 eval** (:func:`evaluate_classifiers`): test accuracy and macro-F1, parameters (all and non-zero), file
  size and forward latency of the dense classifier, the pruned one and the distilled one, on the same test
  split (the held-out plays of ``02b_classify``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classify import ClassifyConfig, build_datasets, classification_metrics, load_classifier, predict
from pipeline.config import CommonConfig, apply_values, doc
from pipeline.manifest import StageError, require_stage
from pipeline.prune import PruneConfig
from pipeline.stage_output import StageOutput
from pipeline.train import SparseTrainer


def classify_config_of(manifest: dict) -> ClassifyConfig:
    """The :class:`ClassifyConfig` a ``02b_classify`` manifest recorded (to rebuild the very same split)."""
    from pipeline.config import _flatten

    cfg = ClassifyConfig()
    problems: list[str] = []
    apply_values(cfg, _flatten(manifest["config"]), "02b_classify manifest", problems)
    if problems:
        raise StageError("the 02b_classify manifest does not fit this version's ClassifyConfig: " + "; ".join(problems))
    return cfg


def _datasets(run_dir: Path, run: str):
    cls_m = require_stage(run_dir, "classify", run)
    data_m = require_stage(run_dir, "data", run)
    from transformers import AutoTokenizer

    model_dir = Path(cls_m["_dir"]) / cls_m["outputs"]["model_dir"]
    sets, names, _ = build_datasets(classify_config_of(cls_m), AutoTokenizer.from_pretrained(model_dir),
                                    int(data_m["outputs"]["seq_len"]))
    return cls_m, data_m, model_dir, sets, names


# ---------------------------------------------------------------------------------------------
# 03 prune


@dataclass
class PruneClassifierConfig(PruneConfig):
    """Stage 03 of the encoder path (preset section ``prune``): PruneConfig's fields, applied to the classifier."""


def bert_ffn_importance(layer: nn.Module, arch: Any = None) -> torch.Tensor:
    """Squared L2 norm per MLP channel: the ``intermediate.dense`` row plus the ``output.dense`` column, ``(I,)``
    (the block's MLP projections as ``arch``, by default :mod:`pipeline.architectures`' ``bert``, names them)."""
    from pipeline import architectures

    (up,), down = (arch or architectures.get("bert")).mlp_projections(layer)
    return up.weight.float().pow(2).sum(1) + down.weight.float().pow(2).sum(0)


@torch.no_grad()
def prune_bert_ffn(model: nn.Module, ratio: float) -> int:
    """Remove ``round(I · ratio)`` MLP channels of every BERT block in place (lowest :func:`bert_ffn_importance`);
    returns the new ``intermediate_size``, also written to ``model.config``.

    Raises:
        ValueError: when no channel would be left.
    """
    inter = model.config.intermediate_size
    keep_n = inter - round(inter * ratio)
    if keep_n < 1:
        raise ValueError(f"mlp ratio {ratio} leaves no MLP channel of {inter}; lower --sparsity/--mlp_ratio")
    from pipeline import architectures

    arch = architectures.of(model)
    if len(arch.mlp_in) != 1:
        raise ValueError(f"MLP-channel pruning of the encoder expects one projection into the MLP channels; "
                         f"'{arch.name}' has {', '.join(arch.mlp_in)}")
    for layer in arch.blocks_of(model)[1]:
        keep = torch.topk(bert_ffn_importance(layer, arch), keep_n).indices.sort().values
        (up,), down = arch.mlp_projections(layer)
        new_up = nn.Linear(up.in_features, keep_n, bias=up.bias is not None)
        new_up.weight.copy_(up.weight[keep])
        if up.bias is not None:
            new_up.bias.copy_(up.bias[keep])
        new_down = nn.Linear(keep_n, down.out_features, bias=down.bias is not None)
        new_down.weight.copy_(down.weight[:, keep])
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
        arch.replace(layer, arch.mlp_in[0], new_up)
        arch.replace(layer, arch.mlp_out, new_down)
    model.config.intermediate_size = keep_n
    return keep_n


def prune_classifier(cfg: PruneClassifierConfig) -> dict | None:
    """Run stage 03 on the ``02b_classify`` model: prune, score the test split, write ``03_prune``.

    Raises:
        StageError: the classification stage missing, a method or option that does not fit a BERT classifier.
    """
    from pipeline import dist
    from pipeline.config import config_hash, legacy_config_hash, to_dict
    from pipeline.manifest import stage_dir, write_manifest
    from pipeline.model import count_params
    from pipeline.sparsity import apply_masks, compute_masks, save_masks, sparsity_report

    t0 = time.time()
    run_dir = cfg.run_dir()
    cls_m, _, dense_dir, sets, names = _datasets(run_dir, cfg.run)
    if cfg.method == "structured" and cfg.head_ratio:
        raise StageError("structured pruning of BERT attention heads is refused: BertConfig derives the head size "
                         "from hidden_size / num_attention_heads, so fewer heads of the old size cannot be described "
                         "and the model would not reload; prune MLP channels only (--head_ratio 0, --mlp_ratio R)")
    out = stage_dir(run_dir, "prune")
    chash = config_hash(cfg)
    # before device and eval_batch_size were marked run-control, this stage's hash held them: accept that output
    output = StageOutput(out)
    output.check(chash, cfg.overwrite, "prune", also_accept=(legacy_config_hash(cfg, ("overwrite",)),))
    if not dist.is_rank0():
        return None
    device = cfg.resolved_device()
    model = load_classifier(dense_dir)
    n_dense = count_params(model)
    masks: dict[str, torch.Tensor] = {}
    outputs: dict[str, Any] = {"model_dir": "model", "config_hash": chash, "method": cfg.method, "masks": None,
                               "teacher_dir": str(dense_dir)}
    try:
        if cfg.method in ("magnitude", "nm"):
            masks = compute_masks(model, cfg.method, cfg.sparsity, cfg.scope, cfg.n, cfg.m, cfg.include, cfg.exclude)
            apply_masks(model, masks)
            rep = sparsity_report(model, masks)
            outputs.update(masks="masks.safetensors", sparsity=rep["overall"], pruned_weights=len(masks))
            if cfg.method == "nm":
                outputs["nm"] = f"{cfg.n}:{cfg.m}"
        else:
            _, mlp_ratio = cfg.ratios()
            outputs["intermediate_size"] = prune_bert_ffn(model, mlp_ratio)
            outputs["intermediate_size_before"] = load_classifier(dense_dir).config.intermediate_size
    except ValueError as e:
        raise StageError(f"prune ({cfg.method}): {e}") from None
    model.to(device)
    y, logits = predict(model, sets["test"], cfg.eval_batch_size * 8, device)
    m = classification_metrics(y, logits.argmax(-1), names, sets["train"].labels)
    model.cpu()
    with output.staging() as staged:  # a temporary folder, swapped in when all succeeded; the manifest last
        tmp = staged.dir
        model.save_pretrained(tmp / "model", safe_serialization=True)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(dense_dir).save_pretrained(tmp / "model")
        if masks:
            save_masks(masks, tmp / "masks.safetensors")
        outputs.update(n_params=count_params(model), n_params_dense=n_dense)
        metrics = {"test_accuracy_after_prune": m["accuracy"], "test_macro_f1_after_prune": m["macro_f1"],
                   "test_accuracy_dense": cls_m["metrics"]["test_accuracy"]}
        print(f"prune ({cfg.method}): test accuracy {cls_m['metrics']['test_accuracy']:.4f} dense -> {m['accuracy']:.4f} "
              f"right after pruning; {outputs['n_params']:,} of {n_dense:,} parameters -> {out / 'model'}")
        return staged.publish(lambda d: write_manifest(d, "prune", to_dict(cfg), outputs, metrics,
                                                       inputs={"classify": cls_m["_dir"]}, seed=cfg.seed,
                                                       wall_time_s=time.time() - t0))


# ---------------------------------------------------------------------------------------------
# 04 distill


@dataclass
class DistillClassifierConfig(ClassifyConfig):
    """Stage 04 of the encoder path (preset section ``distill``): the pruned classifier learns from the dense one."""

    temperature: float = doc("Softmax temperature T of the distillation term (DistilBERT: 2).", 2.0)
    alpha: float = doc("Weight of the distillation term; 1 - alpha weighs the cross-entropy on the labels "
                       "(0: fine-tune without a teacher, the control).", 0.5)

    def validate(self) -> list[str]:
        p = super().validate()
        if self.temperature <= 0:
            p.append(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"alpha must be in [0, 1], got {self.alpha}")
        return p


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DistilBERT's loss on classifier logits, in fp32: ``(loss, kl, ce)``.

    ``kl = T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch (the ``T²`` keeps its gradient's size
    independent of ``T``; Hinton et al., 2015, section 2), ``ce`` the cross-entropy against ``labels``,
    ``loss = alpha · kl + (1 - alpha) · ce``.  Logits ``(B, C)``, labels ``(B,)``.
    """
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s, labels)
    return alpha * kl + (1.0 - alpha) * ce, kl, ce


class ClassifierDistiller(SparseTrainer):
    """Stage 04 of the encoder path: :class:`pipeline.train.SparseTrainer` with a frozen teacher classifier and
    :func:`logit_kd_loss` (without a teacher, ``alpha 0``: the cross-entropy alone).

    Args:
        cfg: a :class:`DistillClassifierConfig`.
        student: the stage-03 classifier in fp32 on CPU.
        teacher: the dense classifier (``requires_grad`` off), or ``None`` for ``alpha 0``.
        masks: the stage-03 masks (``{}`` for a structured student).
        pad_id: the tokenizer's padding id (batches are packed ``input_ids`` + label, see ``classify.unpack``).
        **kwargs: :class:`~pipeline.train.Trainer`'s ``stage``, ``out_dir``, ``tb_dir``, ``data``, ``eval_fn``.
    """

    def __init__(self, cfg: DistillClassifierConfig, student: torch.nn.Module, *, teacher: Any, masks: dict,
                 pad_id: int, **kwargs: Any):
        super().__init__(cfg, student, masks=masks, **kwargs)
        self.teacher, self.pad_id = teacher, pad_id

    def setup(self) -> None:  # every rank
        if self.teacher is not None:  # on the engine's device, in its dtype, in eval mode
            self.teacher.to(device=self.engine.device, dtype=self.engine.dtype).eval()
        super().setup()

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from pipeline.classify import unpack

        ids, mask, labels = unpack(batch, self.pad_id)
        s = self.engine(input_ids=ids, attention_mask=mask).logits
        if self.teacher is None:  # alpha 0: cross-entropy only, no teacher
            ce = F.cross_entropy(s.float(), labels)
            return ce, {"kd/ce": ce.detach()}
        with torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=mask).logits
        loss, kl, ce = logit_kd_loss(s, t, labels, self.cfg.temperature, self.cfg.alpha)
        return loss, {"kd/kl": kl.detach(), "kd/ce": ce.detach()}


def distill_classifier(cfg: DistillClassifierConfig, *, out_dir: str | Path | None = None, stage: str = "distill",
                       tb_name: str = "distill", extra_outputs: dict | None = None) -> dict | None:
    """Run stage 04 of the encoder path; every rank calls it.

    The keyword arguments let a control reuse the stage unchanged (:mod:`pipeline.classify_controls`'
    ``finetune``: the same recipe with ``alpha 0``): ``out_dir`` instead of ``04_distill``, ``stage`` in
    messages and the manifest, TensorBoard under ``tb/<tb_name>``, ``extra_outputs`` added to the manifest's
    outputs.  With ``alpha 0`` the teacher is neither loaded nor run (the loss is the cross-entropy alone).

    Raises:
        StageError: a missing upstream stage, masks that do not fit the student, an export whose pruned
            weights are not all zero, an unusable checkpoint or an fp16 run that cannot go on.
    """
    from pipeline import dist
    from pipeline.budget import training_budget
    from pipeline.checkpoint import CheckpointError
    from pipeline.classify import make_classification_eval
    from pipeline.config import config_hash, to_dict
    from pipeline.controls import arch_summary
    from pipeline.engine import FP16HealthError, device_type
    from pipeline.manifest import stage_dir, write_manifest
    from pipeline.sparsity import count_mask_violations, load_export_state_dict, load_masks
    from pipeline.train import TrainData

    t0 = time.time()
    run_dir = cfg.run_dir()
    cls_m, data_m, teacher_dir, sets, names = _datasets(run_dir, cfg.run)
    prune_m = require_stage(run_dir, "prune", cfg.run)
    student_dir = Path(prune_m["_dir"]) / prune_m["outputs"]["model_dir"]
    masks = load_masks(Path(prune_m["_dir"]) / prune_m["outputs"]["masks"]) if prune_m["outputs"].get("masks") else {}
    student = load_classifier(student_dir)
    teacher = load_classifier(teacher_dir) if cfg.alpha > 0 else None
    if teacher is not None:
        teacher.requires_grad_(False)
    out = Path(out_dir) if out_dir is not None else stage_dir(run_dir, "distill")
    chash = config_hash(cfg)
    StageOutput(out).check(chash, cfg.overwrite, stage)
    seq_len = int(data_m["outputs"]["seq_len"])
    data = TrainData(train=sets["train"], val=sets["val"], tokenizer_dir=student_dir, seq_len=seq_len,
                     data_dir=Path(data_m["_dir"]))
    trainer = ClassifierDistiller(
        cfg, student, teacher=teacher, masks=masks, pad_id=sets["train"].pad_id, stage=stage, out_dir=out,
        tb_dir=cfg.tb_root() / tb_name, data=data, eval_fn=make_classification_eval(names, sets["train"].labels))
    t_train = time.time()
    try:
        r = trainer.fit()  # every rank
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    t_train = time.time() - t_train
    outputs: dict[str, Any] = {"model_dir": "model", "config_hash": chash, "method": prune_m["outputs"]["method"],
                               "teacher_dir": str(teacher_dir) if teacher is not None else None,
                               "student_dir": str(student_dir), "masks": None, "arch": type(student).__name__,
                               "architecture": arch_summary(student.config),
                               "n_params": r.n_params, "temperature": cfg.temperature, "alpha": cfg.alpha,
                               "precision": r.precision, "world_size": r.world_size, "launcher": r.launcher,
                               "zero_stage": r.zero_stage, **(extra_outputs or {})}
    if dist.is_rank0() and masks:
        sd = load_export_state_dict(out / "model")
        bad = {k: v for k, v in count_mask_violations(sd, masks).items() if v}
        if bad:
            raise StageError(f"the export has nonzero weights where the masks say pruned ({bad}); no manifest written")
        import shutil

        shutil.copyfile(Path(prune_m["_dir"]) / prune_m["outputs"]["masks"], out / "masks.safetensors")
        outputs.update(masks="masks.safetensors", mask_violations=0)
    metrics = {"val_loss": r.val_loss, **{k.replace("/", "_"): v for k, v in r.val_metrics.items()},
               "steps": r.steps, "skipped_steps": r.skipped_steps, "precision": r.precision,
               "world_size": r.world_size,
               "budget": training_budget(r.steps, r.tokens_seen, t_train, r.world_size, device_type())}
    return write_manifest(out, stage, to_dict(cfg), outputs, metrics,
                          inputs={"classify": cls_m["_dir"], "prune": prune_m["_dir"]}, seed=cfg.seed,
                          wall_time_s=time.time() - t0)


# ---------------------------------------------------------------------------------------------
# 05 eval


@dataclass
class EvalClassifierConfig(CommonConfig):
    """Stage 05 of the encoder path (preset section ``eval``)."""

    batch_sizes: list[int] = doc("Batch sizes of the forward-latency measurement.", default_factory=lambda: [1, 16])
    repeats: int = doc("Timed forwards per shape (the median is reported).", 5)
    threads: int = doc("CPU threads while timing (0: leave torch's setting).", 1)
    eval_batch_size: int = doc("Passages per forward when scoring the test split.", 64)
    # presets share keys across the decoder's eval section
    seq_lens: list[int] = doc("Unused: the classifier's length is the data's seq_len.", default_factory=list)
    gen_tokens: int = doc("Unused by classifiers.", 0)

    def validate(self) -> list[str]:
        p = []
        if self.repeats < 1 or self.eval_batch_size < 1 or any(b < 1 for b in self.batch_sizes):
            p.append("repeats, eval_batch_size and batch_sizes must be positive")
        return p


def evaluate_classifiers(cfg: EvalClassifierConfig) -> dict | None:
    """Stage 05 of the encoder path: every model of the run on the same test split, one process (rank 0).

    Raises:
        StageError: a missing upstream stage.
    """
    import statistics

    from pipeline import dist
    from pipeline.classify import bag_of_words_baseline
    from pipeline.config import config_hash, to_dict
    from pipeline.controls import LABELS, find_controls
    from pipeline.evaluate import time_ms
    from pipeline.manifest import stage_dir, write_manifest
    from pipeline.metrics import MetricsLogger
    from pipeline.model import count_params
    from pipeline.sparsity import load_masks

    t0 = time.time()
    run_dir = cfg.run_dir()
    cls_m, data_m, dense_dir, sets, names = _datasets(run_dir, cfg.run)
    prune_m = require_stage(run_dir, "prune", cfg.run)
    distill_m = require_stage(run_dir, "distill", cfg.run)
    controls = find_controls(run_dir)  # every finished control (pipeline.classify_controls), scored alike
    out = stage_dir(run_dir, "eval")
    chash = config_hash(cfg)
    output = StageOutput(out, cfg.tb_root() / "eval")
    output.check(chash, cfg.overwrite, "eval")
    if not dist.is_rank0():
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    seq_len = int(data_m["outputs"]["seq_len"])
    method = prune_m["outputs"]["method"]
    entries = {"dense": (dense_dir, None, "classify", None),
               f"pruned ({method})": (Path(prune_m["_dir"]) / "model", prune_m["outputs"].get("masks") and
                                      Path(prune_m["_dir"]) / prune_m["outputs"]["masks"], "prune", None),
               f"distilled ({method})": (Path(distill_m["_dir"]) / "model", distill_m["outputs"].get("masks") and
                                         Path(distill_m["_dir"]) / distill_m["outputs"]["masks"], "distill", None)}
    for c, man in controls:
        o = man.get("outputs", {})
        entries[LABELS[c]] = (Path(man["_dir"]) / o.get("model_dir", "model"),
                              o.get("masks") and Path(man["_dir"]) / o["masks"], "controls", c)
    rows: dict[str, dict] = {}
    for name, (d, masks_path, stage, control) in entries.items():
        if not (Path(d) / "config.json").is_file():
            raise StageError(f"{d} (the model of {name}) holds no config.json; re-run its stage "
                             f"(`make {stage} TASK=classify RUN={cfg.run}`)")
        model = load_classifier(d).to(device).eval()
        y, logits = predict(model, sets["test"], cfg.eval_batch_size, device)
        m = classification_metrics(y, logits.argmax(-1), names, sets["train"].labels)
        n = count_params(model)
        masks = load_masks(masks_path) if masks_path else {}
        pruned = sum(int((~v).sum()) for v in masks.values())
        lat = {}
        for b in cfg.batch_sizes:
            ids = torch.randint(5, model.config.vocab_size, (b, seq_len), device=device,
                                generator=torch.Generator(device=device).manual_seed(0))
            with torch.no_grad():
                times = time_ms(lambda ids=ids, model=model: model(input_ids=ids), warmup=2, repeats=cfg.repeats, device=device)
            lat[f"b{b}"] = statistics.median(times)
        rows[name] = {"dir": str(d), "stage": stage, "control": control, "test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"],
                      "n_params": n, "n_nonzero_params": n - pruned, "masked_sparsity": (pruned / sum(
                          v.numel() for v in masks.values())) if masks else 0.0,
                      "size_bytes": sum(f.stat().st_size for f in Path(d).glob("*.safetensors")),
                      "latency_ms": lat, "classification_report": m["report"]}
    base = rows["dense"]["latency_ms"]
    for r in rows.values():
        r["speedup"] = {k: base[k] / v for k, v in r["latency_ms"].items()}
    with output.staging() as staged:  # temporary folders, swapped in when all succeeded; the manifest last
        with MetricsLogger(staged.dir / "metrics.jsonl", staged.tb_dir) as log:
            for i, r in enumerate(rows.values()):
                log.log(i, {"eval/accuracy": r["test_accuracy"], "eval/macro_f1": r["test_macro_f1"],
                            "eval/params": r["n_params"], "eval/nonzero_params": r["n_nonzero_params"]})
        outputs = {"config_hash": chash, "device": device, "threads": torch.get_num_threads() if device == "cpu" else None,
                   "seq_len": seq_len, "test_passages": len(sets["test"])}
        bow = bag_of_words_baseline(sets["train"], sets["test"], names, cfg.seed)
        metrics = {"models": rows, "majority_accuracy": cls_m["metrics"]["majority_accuracy"],
                   "majority_label": cls_m["metrics"]["majority_label"],
                   "majority_macro_f1": _majority_macro_f1(sets["test"].labels, names, sets["train"].labels),
                   "bag_of_words": {"test_accuracy": bow["accuracy"], "test_macro_f1": bow["macro_f1"], "n": bow["n"],
                                    "features": bow["features"], "model": bow["model"],
                                    "classification_report": bow["report"]},
                   "test_n": len(sets["test"])}
        for name, r in rows.items():
            print(f"eval: {name:<24} accuracy {r['test_accuracy']:.4f}  macro-F1 {r['test_macro_f1']:.4f}  "
                  f"params {r['n_params']:,} (non-zero {r['n_nonzero_params']:,})  latency {r['latency_ms']}")
        print(f"eval: {'bag of words (TF-IDF+LR)':<24} accuracy {bow['accuracy']:.4f}  macro-F1 {bow['macro_f1']:.4f}  "
              f"(majority baseline {metrics['majority_accuracy']:.4f})")
        inputs = {"classify": cls_m["_dir"], "prune": prune_m["_dir"], "distill": distill_m["_dir"],
                  **{f"controls/{c}": man["_dir"] for c, man in controls}}
        return staged.publish(lambda d: write_manifest(d, "eval", to_dict(cfg), outputs, metrics, inputs=inputs,
                                                       seed=cfg.seed, wall_time_s=time.time() - t0))


def _majority_macro_f1(y_true: np.ndarray, names: list[str], train_labels: np.ndarray) -> float:
    """Macro-F1 of predicting the most frequent training label for every passage."""
    from collections import Counter

    maj = int(Counter(np.asarray(train_labels).tolist()).most_common(1)[0][0])
    return classification_metrics(y_true, np.full(len(y_true), maj), names, train_labels)["macro_f1"]


__all__ = ["PruneClassifierConfig", "DistillClassifierConfig", "EvalClassifierConfig", "prune_classifier",
           "distill_classifier", "evaluate_classifiers", "logit_kd_loss", "prune_bert_ffn"]
