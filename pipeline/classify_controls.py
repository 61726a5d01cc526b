"""Compression controls of the encoder path: the classifiers a user would get without pruning, without the teacher or
without the masked-LM pretraining, trained for real.

The decoder's controls (:mod:`pipeline.controls`) for the classifier of ``TASK=classify``: each is a Hugging Face
``BertForSequenceClassification`` directory in ``results/<run>/06_controls/<name>/`` (``model/``, ``metrics.jsonl``,
``ds_config.resolved.json``, checkpoints, ``masks.safetensors`` for a sparse student and, last, ``manifest.json``),
trained through the same loop (:class:`pipeline.train.Trainer`), launcher, precision and DeepSpeed config as the
stage whose recipe it copies, on the same labelled passages and split (rebuilt from ``02b_classify``'s manifest),
and scored on the test plays by stage 05 like every other model:

- ``finetune``: the pruned stage-03 classifier trained with cross-entropy only: stage 04 itself
  (:func:`pipeline.classify_compress.distill_classifier`) with ``alpha 0`` (the teacher neither loaded nor run),
  stage 04's steps and recipe, the masks kept as stage 04 keeps them: what does the teacher add?
- ``dense_plus`` (dense+): the dense fine-tuned classifier of stage 02b trained stage 04's steps more with stage
  04's recipe (LR, warmup, schedule, batch, seed) and cross-entropy: does compression beat training the big
  classifier longer?
- ``scratch``: the student's exact architecture (the stage-03 model's ``config.json``, labels included) from a
  fresh initialisation, no masked-LM pretraining, trained as a classifier for stage 02b's + stage 04's steps with
  stage 02b's recipe; for an unstructured or N:M student the stage-03 masks are applied at initialisation and
  kept through training: what do pretraining, pruning and the teacher buy?

The budget rules, upstream checks (a control whose upstream manifests changed is replaced, one whose own options
changed is refused without ``--overwrite``), labels and manifests are :mod:`pipeline.controls`'.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import dist
from pipeline.config import config_hash, doc, to_dict
from pipeline.controls import (
    LABELS,
    ControlConfig,
    arch_summary,
    config_from_manifest,
    control_dir,
    student_masks,
    upstream_changed,
    upstream_shas,
)
from pipeline.manifest import StageError, require_stage
from pipeline.stage_output import StageOutput

#: control name -> what it is (one line, as the report shows it), in the order `make controls` trains them
CLASSIFY_CONTROLS: dict[str, str] = {
    "dense_plus": "the dense classifier (02b) trained stage 04's steps more with stage 04's recipe",
    "finetune": "the pruned classifier trained with cross-entropy only for stage 04's steps (no teacher)",
    "scratch": "the student's architecture from a fresh initialisation (no masked-LM pretraining), trained as a "
               "classifier for stage 02b + 04's steps with 02b's recipe",
}
#: the upstream stages every control reads
UPSTREAM = ("data", "pretrain", "classify", "prune", "distill")


@dataclass
class ClassifierControlConfig(ControlConfig):
    """One classifier control per invocation (``scripts/controls_classifier.py --control NAME``); preset section
    ``controls``.  The recipe is read from the manifests of stage 02b (``scratch``) or 04 (``dense_plus``,
    ``finetune``)."""

    control: Literal["dense_plus", "finetune", "scratch"] = doc(
        "Which control to train: dense_plus, finetune or scratch (see pipeline/classify_controls.py).", "finetune")
    max_steps: int = doc("Optimizer steps of this control (0: its budget rule: stage 04's steps; stage 02b's + 04's "
                         "for scratch).", 0)


def classifier_control_steps(cfg: ClassifierControlConfig, classify_steps: int, distill_steps: int) -> tuple[int, str]:
    """The control's optimizer steps and the rule, in words, that set them."""
    if cfg.max_steps:
        return cfg.max_steps, f"{cfg.max_steps} steps (--max_steps)"
    if cfg.control == "scratch":
        whole = classify_steps + distill_steps
        return whole, f"stage 02b's {classify_steps} + stage 04's {distill_steps} = {whole} classification steps"
    return distill_steps, f"stage 04's {distill_steps} steps"


def classifier_control_recipe(cfg: ClassifierControlConfig, manifests: dict[str, dict]) -> tuple[Any, dict]:
    """The training configuration of control ``cfg.control`` and where it came from.

    Args:
        manifests: ``{stage: manifest}`` of :data:`UPSTREAM` (``require_stage``'s, with ``_dir``).

    Returns:
        ``(train_cfg, info)``: a :class:`~pipeline.classify_compress.DistillClassifierConfig` with ``alpha 0``
        for ``finetune`` and ``dense_plus``, a :class:`~pipeline.classify.ClassifyConfig` for ``scratch``;
        ``info`` holds ``recipe_from``, ``budget_rule``, ``notes``.

    Raises:
        StageError: a recipe that does not load or validate (manifests of another version of the code).
    """
    from pipeline.classify import ClassifyConfig
    from pipeline.classify_compress import DistillClassifierConfig

    name = cfg.control
    cls_m, dis_m = manifests["classify"], manifests["distill"]
    steps, rule = classifier_control_steps(cfg, int(cls_m["config"]["max_steps"]), int(dis_m["config"]["max_steps"]))
    notes: list[str] = []
    if name in ("finetune", "dense_plus"):
        tc = config_from_manifest(DistillClassifierConfig, dis_m["config"])
        tc.alpha = 0.0  # cross-entropy only
        recipe_from = "04_distill"
    else:
        tc = config_from_manifest(ClassifyConfig, cls_m["config"])
        recipe_from = "02b_classify"
    tc.max_steps = steps
    if tc.warmup_steps >= steps:
        w = max(1, steps // 10)
        notes.append(f"warmup {tc.warmup_steps} steps is not shorter than the {steps} steps: {w} used")
        tc.warmup_steps = w
    tc.run, tc.results_dir, tc.preset, tc.overwrite = cfg.run, cfg.results_dir, cfg.preset, cfg.overwrite
    tc.resume, tc.progress, tc.halt_after_step = cfg.resume, cfg.progress, cfg.halt_after_step
    if cfg.ds_config:
        tc.ds_config = cfg.ds_config
    if cfg.precision:
        tc.precision = cfg.precision
    problems = tc.validate()
    if problems:
        raise StageError(f"control {name}: the recipe from {recipe_from} does not validate: " + "; ".join(problems))
    return tc, {"recipe_from": recipe_from, "budget_rule": rule, "notes": notes}


def scratch_classifier(student_dir: str | Path, seed: int, masks: dict | None = None):
    """The student classifier's architecture (its ``config.json`` as it is, labels included) freshly initialised
    in fp32 with SDPA attention, ``torch.manual_seed(seed)`` right before; pruned entries of ``masks`` zeroed.

    Raises:
        ValueError: masks that do not fit the architecture.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(student_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if masks:
        from pipeline.sparsity import apply_masks

        apply_masks(model, masks)
    return model


def train_classifier_control(cfg: ClassifierControlConfig) -> dict | None:
    """Train classifier control ``cfg.control`` into ``06_controls/<name>/``; return its manifest (rank 0, else
    ``None``).  Every rank must call it; only rank 0 writes.  TensorBoard: ``results/<run>/tb/controls/<name>``.

    Raises:
        StageError: an upstream stage missing (naming its make target), an output of other options without
            ``--overwrite``, an unusable checkpoint, or an export with non-zero pruned weights.
    """
    from pipeline.budget import training_budget
    from pipeline.checkpoint import CheckpointError
    from pipeline.classify import load_classifier, make_classification_eval, make_classification_loss
    from pipeline.classify_compress import _datasets, distill_classifier
    from pipeline.engine import FP16HealthError, device_type
    from pipeline.manifest import write_manifest
    from pipeline.model import count_params
    from pipeline.sparsity import count_mask_violations, load_export_state_dict
    from pipeline.train import SparseTrainer, TrainData

    t0 = time.time()
    name = cfg.control
    run_dir = cfg.run_dir()
    mans = {s: require_stage(run_dir, s, cfg.run) for s in UPSTREAM}
    if mans["pretrain"]["outputs"].get("objective") != "masked-lm" or "labels" not in mans["classify"]["outputs"]:
        raise StageError(f"run {cfg.run} is not an encoder run; the classifier controls need TASK=classify "
                         f"(`make controls TASK=classify RUN={cfg.run}`)")
    out = control_dir(run_dir, name)
    tc, info = classifier_control_recipe(cfg, mans)
    shas = upstream_shas(mans)
    if upstream_changed(out, shas):
        if dist.is_rank0():
            print(f"[{name}] the upstream stages changed since this control was made: replacing it", flush=True)
        tc.overwrite, tc.resume = True, "none"
    prune_m = mans["prune"]
    student_dir = Path(prune_m["_dir"]) / prune_m["outputs"]["model_dir"]
    method = prune_m["outputs"].get("method")
    extra = {"control": name, "label": LABELS[name], "description": CLASSIFY_CONTROLS[name], "task": "classify",
             "compared_method": method, "upstream_manifests": shas, **info}
    if name == "finetune":  # stage 04 itself with alpha 0 (masks kept as stage 04 keeps them)
        return distill_classifier(tc, out_dir=out, stage="finetune", tb_name=f"controls/{name}",
                                  extra_outputs=extra)

    masks_path, masks = student_masks(prune_m) if name == "scratch" else (None, {})
    chash = config_hash(tc)
    StageOutput(out).check(chash, tc.overwrite, f"control {name}")
    cls_m, data_m, dense_dir, sets, names = _datasets(run_dir, cfg.run)
    if name == "dense_plus":
        model = load_classifier(dense_dir)
        init_from = str(dense_dir)
    else:
        try:
            model = scratch_classifier(student_dir, tc.seed, masks)
        except ValueError as e:
            raise StageError(f"the stage-03 masks do not fit the student's architecture ({e}); "
                             f"re-run `make prune TASK=classify RUN={cfg.run}`") from None
        init_from = ""
    seq_len = int(data_m["outputs"]["seq_len"])
    data = TrainData(train=sets["train"], val=sets["val"], tokenizer_dir=Path(dense_dir), seq_len=seq_len,
                     data_dir=Path(data_m["_dir"]))

    t_train = time.time()
    try:
        r = SparseTrainer(tc, model, masks=masks, stage=name, out_dir=out, tb_dir=cfg.tb_root() / "controls" / name,
                          data=data, loss_fn=make_classification_loss(sets["train"].pad_id),
                          eval_fn=make_classification_eval(names, sets["train"].labels)).fit()  # every rank
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    t_train = time.time() - t_train
    if not dist.is_rank0():
        return None
    outputs: dict[str, Any] = {"model_dir": "model", "config_hash": chash, **extra, "method": None, "masks": None,
                               "arch": type(model).__name__, "n_params": r.n_params,
                               "architecture": arch_summary(model.config), "init_from": init_from or None,
                               "precision": r.precision, "world_size": r.world_size, "launcher": r.launcher,
                               "zero_stage": r.zero_stage}
    if name == "scratch":  # the student's architecture (and masks): the size, sparsity and method it controls
        outputs.update(method=method, student_dir=str(student_dir))
    if masks:  # sparsity is a fact about the exported weights
        sd = load_export_state_dict(Path(r.model_dir))
        bad = {k: v for k, v in count_mask_violations(sd, masks).items() if v}
        if bad:
            raise StageError(f"the export {r.model_dir} has nonzero weights where the masks say pruned ({bad}); "
                             "no manifest written. This is a bug in mask keeping: please report it")
        shutil.copyfile(masks_path, out / "masks.safetensors")
        pruned = sum(int((~m).sum()) for m in masks.values())
        outputs.update(masks="masks.safetensors", mask_violations=0,
                       sparsity=pruned / sum(m.numel() for m in masks.values()))
    metrics = {"val_loss": r.val_loss, **{k.replace("/", "_"): v for k, v in r.val_metrics.items()},
               "steps": r.steps, "skipped_steps": r.skipped_steps, "precision": r.precision,
               "world_size": r.world_size, "resumed_from": r.resumed_from, "params_counted": count_params(model),
               "budget": training_budget(r.steps, r.tokens_seen, t_train, r.world_size, device_type())}
    config = to_dict(tc)
    config["control"] = name
    return write_manifest(out, "controls", config, outputs, metrics, inputs={s: m["_dir"] for s, m in mans.items()},
                          seed=tc.seed, wall_time_s=time.time() - t0)


__all__ = ["CLASSIFY_CONTROLS", "ClassifierControlConfig", "classifier_control_recipe", "classifier_control_steps",
           "scratch_classifier", "train_classifier_control"]
