"""Compression controls: the models a user would get without pruning or without the teacher, trained for real.

A compressed student is only worth its perplexity when it beats what the same compute buys otherwise.  Each
control is a Hugging Face model directory in ``results/<run>/06_controls/<name>/`` (with ``metrics.jsonl``,
``ds_config.resolved.json``, checkpoints and, last, ``manifest.json``), trained through the same loop
(:class:`pipeline.train.Trainer`), launcher, precision and DeepSpeed config as the stage whose recipe it
copies, on the same data and validation split, and evaluated by stage 05 like every other model:

- ``dense_plus`` (dense+): the dense stage-02 model trained stage 04's steps more, with stage 04's recipe (LR,
  warmup, schedule, batch, seed: the same data order): does compression beat training the big model longer?
- ``finetune``: the pruned stage-03 student trained with cross-entropy only: stage 04 itself
  (:func:`pipeline.distill.distill`) with ``alpha 0`` and no hidden-state term, masks kept exactly as stage 04
  keeps them: what does the teacher add?
- ``scratch``: the student's exact architecture (its ``config.json``: sizes, head size and all) from a fresh
  initialisation, with stage 02's recipe for stage 04's number of steps; for an unstructured or N:M student the
  stage-03 masks are applied at initialisation and kept fixed through training (a sparse model trained from
  scratch with the student's sparsity pattern): what do pruning and the teacher buy at stage 04's budget?
- ``scratch_full``: the same for stage 02's + stage 04's steps, the whole budget of the student (less when a
  preset sets ``scratch_full_steps`` to fit a time budget; the manifest and the report say so).

Every control reads its recipe from the upstream stages' manifests (what they ran with, command-line overrides
included), never from the preset, so it matches the run it is compared with.  A control whose upstream
manifests changed since it was made is replaced (its checkpoints are not resumed); one whose own options
changed is refused without ``--overwrite``, as every stage is.  It is generic over the pruning method: the
architecture comes from the stage-03 model's config and the masks, if any, from its manifest.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import dist
from pipeline.config import CommonConfig, _flatten, _leaf_fields, apply_values, config_hash, doc, to_dict
from pipeline.manifest import (
    MANIFEST,
    StageError,
    file_sha256,
    read_manifest,
    require_stage,
)
from pipeline.stage_output import StageOutput

CONTROLS_DIR = "06_controls"

#: control name -> what it is (one line, as the report shows it)
CONTROLS: dict[str, str] = {
    "dense_plus": "the dense model trained stage 04's steps more (stage 04's recipe)",
    "finetune": "the pruned student fine-tuned with cross-entropy only (stage 04 without the teacher)",
    "scratch": "the student's architecture from a fresh initialisation, stage 04's step budget",
    "scratch_full": "the student's architecture from a fresh initialisation, stage 02 + 04's step budget",
}
#: control name -> the label tables use
LABELS = {"dense_plus": "dense+", "finetune": "finetune", "scratch": "scratch", "scratch_full": "scratch (whole)"}
#: the upstream stages every control reads
UPSTREAM = ("data", "pretrain", "prune", "distill")


@dataclass
class ControlConfig(CommonConfig):
    """One control per invocation (``scripts/controls.py --control NAME``); preset section ``controls``.

    The training recipe is not set here: it is read from the manifests of stage 02 (``scratch``,
    ``scratch_full``) or stage 04 (``dense_plus``, ``finetune``).
    """

    control: Literal["dense_plus", "finetune", "scratch", "scratch_full"] = doc(
        "Which control to train: dense_plus, finetune, scratch or scratch_full (see pipeline/controls.py).",
        "dense_plus")
    max_steps: int = doc("Optimizer steps of this control (0: its budget rule: stage 04's steps; stage 02's + "
                         "04's for scratch_full, or scratch_full_steps).", 0)
    scratch_full_steps: int = doc("Steps of scratch_full when max_steps is 0 (0: stage 02's + stage 04's, the whole "
                                  "budget); a preset sets it when the whole budget does not fit its time budget.", 0)
    ds_config: str = doc("DeepSpeed config template ('': the one the recipe's stage ran with).", "")
    precision: str = doc("auto, fp16, bf16 or fp32 ('': the precision the recipe's stage asked for).", "")
    resume: str = doc("'auto' (newest complete checkpoint), 'none', or a checkpoint dir.", "auto", run_control=True)
    progress: bool = doc("Show a progress bar on rank 0.", True, run_control=True)
    halt_after_step: int = doc("Stop right after this step's checkpoint as if killed (resume drills); 0 = never.", 0,
                               run_control=True)

    def validate(self) -> list[str]:
        p = []
        for name in ("max_steps", "scratch_full_steps", "halt_after_step"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if self.precision not in ("", "auto", "fp16", "bf16", "fp32"):
            p.append(f"precision must be '', auto, fp16, bf16 or fp32, got {self.precision!r}")
        if self.ds_config and not Path(self.ds_config).is_file():
            p.append(f"ds_config '{self.ds_config}' does not exist; pass one of ds_configs/*.json or leave it empty")
        return p


def control_dir(run_dir: str | Path, name: str) -> Path:
    """``<run_dir>/06_controls/<name>``."""
    return Path(run_dir) / CONTROLS_DIR / name


# ---------------------------------------------------------------------------------------------
# the recipe of each control, from the upstream manifests


def config_from_manifest(cls: type, config: dict) -> Any:
    """A ``cls`` (a :class:`~pipeline.train.TrainConfig` or subclass) holding a stage manifest's ``config``.

    Keys ``cls`` does not have (another stage's fields, or stage 04's description of its student under
    ``model``) are left out.

    Raises:
        StageError: a value the configuration refuses (a manifest of another version of this code).
    """
    cfg = cls()
    leaves = set(_leaf_fields(cls))
    problems: list[str] = []
    apply_values(cfg, {k: v for k, v in _flatten(config).items() if k in leaves}, "manifest", problems)
    if problems:
        raise StageError("the upstream manifest's configuration does not load: " + "; ".join(problems)
                         + "; re-run the upstream stage with this version of the code")
    return cfg


def control_steps(cfg: ControlConfig, pretrain_steps: int, distill_steps: int) -> tuple[int, str]:
    """The control's optimizer steps and the rule, in words, that set them."""
    name = cfg.control
    if cfg.max_steps:
        return cfg.max_steps, f"{cfg.max_steps} steps (--max_steps)"
    if name != "scratch_full":
        return distill_steps, f"stage 04's {distill_steps} steps"
    whole = pretrain_steps + distill_steps
    if cfg.scratch_full_steps and cfg.scratch_full_steps != whole:
        return cfg.scratch_full_steps, (f"{cfg.scratch_full_steps} steps (preset {cfg.preset}'s scratch_full_steps; "
                                        f"the whole budget, stage 02's {pretrain_steps} + stage 04's {distill_steps} "
                                        f"= {whole} steps, did not fit its time budget)")
    return whole, f"stage 02's {pretrain_steps} + stage 04's {distill_steps} = {whole} steps"


def control_recipe(cfg: ControlConfig, manifests: dict[str, dict]) -> tuple[Any, dict[str, Any]]:
    """The training configuration of control ``cfg.control`` and a description of where it came from.

    Args:
        manifests: ``{stage: manifest}`` of :data:`UPSTREAM` (``require_stage``'s, with ``_dir``).

    Returns:
        ``(train_cfg, info)``: a :class:`~pipeline.distill.DistillConfig` for ``finetune``, a
        :class:`~pipeline.train.TrainConfig` otherwise; ``info`` holds ``recipe_from``, ``budget_rule``,
        ``notes``.
    """
    from pipeline.distill import DistillConfig
    from pipeline.train import TrainConfig

    name = cfg.control
    pre, dis = manifests["pretrain"], manifests["distill"]
    pre_steps, dis_steps = int(pre["config"]["max_steps"]), int(dis["config"]["max_steps"])
    steps, rule = control_steps(cfg, pre_steps, dis_steps)
    notes: list[str] = []
    if name == "finetune":
        tc = config_from_manifest(DistillConfig, dis["config"])
        tc.alpha, tc.hidden_mse_weight = 0.0, 0.0
        recipe_from = "04_distill"
    elif name == "dense_plus":
        tc = config_from_manifest(TrainConfig, dis["config"])
        tc.model = config_from_manifest(TrainConfig, pre["config"]).model  # the teacher's shape, for the record
        tc.init_from = str(Path(pre["_dir"]) / pre["outputs"]["model_dir"])
        recipe_from = "04_distill"
    else:
        tc = config_from_manifest(TrainConfig, pre["config"])
        tc.init_from = ""
        recipe_from = "02_pretrain"
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


def upstream_shas(manifests: dict[str, dict]) -> dict[str, str]:
    """sha256 of each upstream manifest file: what a control was made from."""
    return {s: file_sha256(Path(m["_dir"]) / MANIFEST) for s, m in manifests.items()}


def upstream_changed(out: Path, shas: dict[str, str]) -> bool:
    """True when ``out`` holds a control made from other upstream manifests than ``shas``."""
    m = out / MANIFEST
    if not m.is_file():
        return False
    try:
        old = read_manifest(m).get("outputs", {}).get("upstream_manifests")
    except (OSError, ValueError):
        return False
    return old is not None and old != shas


# ---------------------------------------------------------------------------------------------
# the models


def student_masks(prune_manifest: dict) -> tuple[Path | None, dict]:
    """The stage-03 mask file (``None`` for a structured student) and its masks (``{}`` without).

    Raises:
        StageError: a mask file the manifest lists that is missing.
    """
    from pipeline.sparsity import load_masks

    rel = prune_manifest["outputs"].get("masks")
    if not rel:
        return None, {}
    path = Path(prune_manifest["_dir"]) / rel
    try:
        return path, load_masks(path)
    except FileNotFoundError as e:
        raise StageError(f"{e}: stage 03 lists it; re-run `make prune`") from None


def scratch_model(student_dir: str | Path, seed: int, masks: dict | None = None):
    """The student's architecture (its ``config.json`` as it is) freshly initialised in fp32 with SDPA attention,
    ``torch.manual_seed(seed)`` right before; pruned entries of ``masks`` set to zero."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(student_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if masks:
        from pipeline.sparsity import apply_masks

        apply_masks(model, masks)
    return model


def arch_summary(config: Any) -> dict[str, Any]:
    """The shape fields of a ``transformers`` config (what "the same architecture" compares)."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


# ---------------------------------------------------------------------------------------------
# the stage


def train_control(cfg: ControlConfig) -> dict | None:
    """Train control ``cfg.control`` into ``06_controls/<name>/``; return its manifest (rank 0, else ``None``).

    Every rank must call it; only rank 0 writes.  TensorBoard goes to ``results/<run>/tb/controls/<name>``.

    Raises:
        StageError: an upstream stage missing (naming its make target), an output of other options without
            ``--overwrite``, an unusable checkpoint, or an export with non-zero pruned weights.
    """
    from pipeline.budget import budget_of, training_budget
    from pipeline.checkpoint import CheckpointError
    from pipeline.distill import distill
    from pipeline.engine import FP16HealthError, device_type
    from pipeline.manifest import write_manifest
    from pipeline.model import count_params, load_model
    from pipeline.sparsity import count_mask_violations, load_export_state_dict
    from pipeline.train import SparseTrainer, TrainData

    t0 = time.time()
    name = cfg.control
    run_dir = cfg.run_dir()
    mans = {s: require_stage(run_dir, s, cfg.run) for s in UPSTREAM}
    out = control_dir(run_dir, name)
    tc, info = control_recipe(cfg, mans)
    shas = upstream_shas(mans)
    if upstream_changed(out, shas):
        if dist.is_rank0():
            print(f"[{name}] the upstream stages changed since this control was made: replacing it", flush=True)
        tc.overwrite, tc.resume = True, "none"
    student_dir = Path(mans["prune"]["_dir"]) / mans["prune"]["outputs"]["model_dir"]
    method = mans["prune"]["outputs"].get("method")
    extra = {"control": name, "label": LABELS[name], "description": CONTROLS[name], "compared_method": method,
             "upstream_manifests": shas, **info}
    if name == "finetune":  # stage 04 itself with alpha 0 (masks kept as stage 04 keeps them)
        return distill(tc, out_dir=out, stage="finetune", tb_name=f"controls/{name}", extra_outputs=extra)

    masks_path, masks = student_masks(mans["prune"]) if name != "dense_plus" else (None, {})
    chash = config_hash(tc)
    StageOutput(out).check(chash, tc.overwrite, f"control {name}")
    data = TrainData.from_manifest(mans["data"])
    if name == "dense_plus":
        model = load_model(tc.init_from, vocab_size=int(mans["data"]["outputs"]["vocab_size"]))
    else:
        try:
            model = scratch_model(student_dir, tc.seed, masks)
        except ValueError as e:
            raise StageError(f"the stage-03 masks do not fit the student's architecture ({e}); "
                             f"re-run `make prune RUN={cfg.run}`") from None

    t_train = time.time()
    try:
        r = SparseTrainer(tc, model, masks=masks, stage=name, out_dir=out, tb_dir=cfg.tb_root() / "controls" / name,
                          data=data).fit()  # every rank
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    t_train = time.time() - t_train
    if not dist.is_rank0():
        return None
    outputs: dict[str, Any] = {"model_dir": "model", "config_hash": chash, **extra, "method": None, "masks": None,
                               "arch": type(model).__name__, "n_params": r.n_params,
                               "architecture": arch_summary(model.config)}
    if name == "dense_plus":
        outputs["init_from"] = tc.init_from
    else:  # the student's architecture (and masks): the size, sparsity and method of the model it controls
        outputs.update(method=method, student_dir=str(student_dir))
    if masks:  # sparsity is a fact about the exported weights
        sd = load_export_state_dict(Path(r.model_dir))
        bad = {k: v for k, v in count_mask_violations(sd, masks).items() if v}
        if bad:
            raise StageError(f"the export {r.model_dir} has nonzero weights where the masks say pruned ({bad}); "
                             "no manifest written. This is a bug in mask keeping: please report it")
        shutil.copyfile(masks_path, out / "masks.safetensors")
        pruned = sum(int((~m).sum()) for m in masks.values())
        outputs.update(masks="masks.safetensors", mask_violations=0, sparsity=pruned / sum(m.numel() for m in
                                                                                           masks.values()),
                       sparsity_checked=True)
    parent = budget_of(mans["pretrain"]) if name == "dense_plus" else None
    metrics = {"val_loss": r.val_loss, "val_ppl": r.val_ppl, "steps": r.steps, "tokens_seen": r.tokens_seen,
               "skipped_steps": r.skipped_steps, "loss_scale": r.loss_scale, "tokens_per_s": r.tokens_per_s,
               "mfu": r.mfu, "precision": r.precision, "precision_note": r.precision_note,
               "zero_stage": r.zero_stage, "world_size": r.world_size, "launcher": r.launcher, "backend": r.backend,
               "resumed_from": r.resumed_from, "history": r.history,
               "budget": training_budget(r.steps, r.tokens_seen, t_train, r.world_size, device_type(), parent=parent,
                                         parent_name="pretrain" if parent else None),
               "regime": r.regime, "params_counted": count_params(model)}
    config = to_dict(tc)
    config["model"] = {"from": tc.init_from or str(student_dir), **arch_summary(model.config)}
    config["control"] = name
    manifest = write_manifest(out, "controls", config, outputs, metrics,
                              inputs={s: m["_dir"] for s, m in mans.items()}, seed=tc.seed,
                              wall_time_s=time.time() - t0)
    return manifest


def find_controls(run_dir: str | Path) -> list[tuple[str, dict]]:
    """``(name, manifest)`` of every finished control of a run, in :data:`CONTROLS` order (manifests with
    ``_dir``).

    Raises:
        StageError: a control directory without a complete manifest (an interrupted run: ``make controls``).
    """
    out = []
    for name in CONTROLS:
        d = control_dir(run_dir, name)
        if not d.exists():
            continue
        m = d / MANIFEST
        if not m.is_file():
            raise StageError(f"control '{name}' is incomplete: {d} has no {MANIFEST} (interrupted run?); run "
                             f"`make controls RUN={Path(run_dir).name}` (or delete {d})")
        man = read_manifest(m)
        if not man.get("complete"):
            raise StageError(f"control '{name}': {m} is not complete; run `make controls RUN={Path(run_dir).name}`")
        man["_dir"] = str(d)
        out.append((name, man))
    return out


def control_entries(run_dir: str | Path) -> list:
    """Stage 05's :class:`~pipeline.evaluate.ModelEntry` of every finished control (stage ``controls``).

    Raises:
        StageError: as :func:`find_controls`, or a manifest naming a missing model or mask file.
    """
    from pipeline.evaluate import ModelEntry

    entries = []
    for name, man in find_controls(run_dir):
        d, o = Path(man["_dir"]), man.get("outputs", {})
        mdir = d / o.get("model_dir", "model")
        if not (mdir / "config.json").is_file():
            raise StageError(f"{mdir} (the model of control {name}) holds no config.json; re-run "
                             f"`make controls RUN={Path(run_dir).name}`")
        masks = d / o["masks"] if o.get("masks") else None
        if masks is not None and not masks.is_file():
            raise StageError(f"{masks} (the masks of control {name}) does not exist; re-run `make controls`")
        entries.append(ModelEntry(name, "controls", d, mdir, man, o.get("method"), masks))
    return entries
