"""The encoder path's report: ``results/<run>/report.md`` from what stages 01-05 (02b included) wrote.

Sections: the data and the split by play, masked-LM pretraining (loss and accuracy on the fixed validation
masking), the classifier on the held-out plays (accuracy beside the majority-class baseline, macro-F1, the
per-class report, the confusion matrix), the compressed classifiers (accuracy, macro-F1, parameters, latency),
and the compression against its controls (:mod:`pipeline.classify_controls`) and two baselines (the majority class,
a bag of words): a table, and headline sentences computed from it that answer "did compression pay?" and state
every comparison the student loses as a loss.  Measures nothing; only reads manifests and logs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST, read_manifest, require_stage


def _f(x: Any, d: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def report_table(report: dict, names: list[str]) -> list[str]:
    """sklearn's ``classification_report(output_dict=True)`` as a Markdown table (classes, then the averages)."""
    lines = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in [*names, "macro avg", "weighted avg"]:
        r = report.get(k)
        if r is not None:
            lines.append(f"| {k} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | "
                         f"{int(r['support'])} |")
    return lines


# ---------------------------------------------------------------------------------------------
# compression against its controls (pipeline.classify_controls) and the baselines

#: what each model is, in the words of the controls table and the headline
ROLE = {"classify": "the dense fine-tuned classifier (stage 02b)", "prune": "the student right after pruning (stage 03)",
        "distill": "the pruned student distilled from the dense classifier (stage 04)",
        "dense_plus": "the dense classifier trained stage 04's steps more (stage 04's recipe)",
        "finetune": "the pruned student trained with cross-entropy only (no teacher)",
        "scratch": "the student's architecture from a fresh initialisation, no masked-LM pretraining"}


def role(row: dict) -> str:
    """What an evaluated model is, in words (by its stage, or its control's name)."""
    return ROLE.get(row.get("control") or row.get("stage") or "", row.get("stage") or "?")


def _pts(x: float) -> str:
    """An accuracy difference in percentage points, unsigned: ``0.031`` -> ``3.1 points``."""
    return f"{100 * abs(x):.1f} points"


def _versus(s: float, r: float, what: str, detail: str, noise: float = 0.0) -> str:
    """'beats X by 3.1 points (detail)' / '**loses to** X by 3.1 points (detail)' / 'ties with X (detail)' (accuracy
    ``s`` against ``r``), '; within noise' added to the parenthesis when the difference is below ``noise``."""
    if abs(s - r) < 1e-9:
        return f"ties with {what} ({detail})"
    tail = "; within noise" if abs(s - r) < noise else ""
    verb = "beats" if s > r else "**loses to**"
    return f"{verb} {what} by {_pts(s - r)} ({detail}{tail})"


def student_name(models: dict[str, dict]) -> str | None:
    """The evaluated row of the compressed student: the distilled one, else the pruned one."""
    for stage in ("distill", "prune"):
        for n, r in models.items():
            if r.get("stage") == stage:
                return n
    return None


def same_size(models: dict[str, dict], name: str, tol: float = 0.01) -> list[str]:
    """The models whose non-zero parameter count is within ``tol`` (relative) of ``name``'s."""
    nz = models[name]["n_nonzero_params"]
    return [n for n, r in models.items() if abs(r["n_nonzero_params"] - nz) <= tol * nz]


def _rank_key(r: dict) -> tuple[float, float]:
    return (r["test_accuracy"], r["test_macro_f1"])


def classify_headline_lines(models: dict[str, dict], baselines: dict[str, dict], n_test: int, steps: dict[str, dict],
                            ref: str | None) -> list[str]:
    """"Did compression pay?" in sentences computed from the numbers of stage 05.

    Args:
        models: stage 05's ``metrics["models"]`` (name -> ``stage``, ``control``, ``test_accuracy``,
            ``test_macro_f1``, ``n_nonzero_params``, ``speedup``).
        baselines: ``{"majority": {"accuracy", "macro_f1"}, "bag_of_words": {...}}`` (either may be missing).
        n_test: test passages (for the binomial standard error of an accuracy, ``sqrt(p (1 - p) / n)``).
        steps: name -> ``{"mlm": masked-LM steps, "cls": classification steps}`` in all (see :func:`lineage_steps`).
        ref: the latency shape of the speed-up (``b1``), or ``None``.

    Every comparison the student loses is stated as a loss ("**loses to**"); none is left out.
    """
    s_name = student_name(models)
    if s_name is None:
        return []
    s = models[s_name]
    noise = 0.0
    if n_test:  # two binomial standard errors of the student's accuracy
        p = min(max(s["test_accuracy"], 1 / n_test), 1 - 1 / n_test)
        noise = 2 * (p * (1 - p) / n_test) ** 0.5
    who = "The distilled student" if s.get("stage") == "distill" else "The pruned student (no stage 04 in this run)"
    acc = f"accuracy {_f(s['test_accuracy'])}, macro-F1 {_f(s['test_macro_f1'])}"
    controls = [n for n, r in models.items() if r.get("stage") == "controls"]
    out = []
    if not controls:
        out.append(f"- {who} has test {acc}. This run has **no control models** (`make controls TASK=classify`), so "
                   f"nothing here says whether compression beat fine-tuning without the teacher, training the small "
                   f"architecture from scratch or training the dense classifier longer.")
    else:
        group = same_size(models, s_name)
        others = [n for n in group if n != s_name]
        top = max((models[n]["test_accuracy"] for n in others), default=None)
        if top is None or s["test_accuracy"] > top:
            by = "" if top is None else (f", {_pts(s['test_accuracy'] - top)} above the next"
                                         + (", within noise" if s["test_accuracy"] - top < noise else ""))
            out.append(f"- **Compression paid off at the student's size**: {who.lower()} has the highest test accuracy "
                       f"of the {len(group)} models with its {_int(s['n_nonzero_params'])} non-zero parameters "
                       f"({acc}{by}).")
        elif s["test_accuracy"] == top:
            tied = ", ".join(n for n in others if models[n]["test_accuracy"] == top)
            out.append(f"- **Compression did not pay off at the student's size**: {who.lower()} only ties with {tied} "
                       f"on test accuracy ({_f(top)}) among the {len(group)} models with its "
                       f"{_int(s['n_nonzero_params'])} non-zero parameters.")
        else:
            best = max(others, key=lambda n: _rank_key(models[n]))
            b = models[best]
            out.append(f"- **Compression did not pay off at the student's size**: {best}, {role(b)}, reaches test "
                       f"accuracy {_f(b['test_accuracy'])} (macro-F1 {_f(b['test_macro_f1'])}), {who.lower()} "
                       f"{_f(s['test_accuracy'])} (macro-F1 {_f(s['test_macro_f1'])}): the student loses by "
                       f"{_pts(s['test_accuracy'] - b['test_accuracy'])}"
                       + (", within noise." if b["test_accuracy"] - s["test_accuracy"] < noise else "."))
        order = ["scratch", "finetune", "dense_plus"]
        clauses = []
        s_cls = steps.get(s_name, {}).get("cls")
        for c in sorted(controls, key=lambda n: order.index(models[n]["control"])
                        if models[n].get("control") in order else len(order)):
            r, st = models[c], steps.get(c, {})
            same = "the same " if st.get("cls") == s_cls else ""
            theirs = "" if st.get("cls") == s_cls else f", the student {s_cls}"
            what = {"finetune": f"fine-tuning the pruned student without the teacher for {same}{st.get('cls')} "
                                f"classification steps in all{theirs}",
                    "scratch": f"its architecture trained from scratch without masked-LM pretraining for "
                               f"{st.get('cls')} classification steps",
                    "dense_plus": f"the dense classifier ({_int(r['n_nonzero_params'])} non-zero parameters) trained "
                                  f"longer instead"}.get(r.get("control"), c)
            clauses.append(_versus(s["test_accuracy"], r["test_accuracy"], what,
                                   f"{c}: accuracy {_f(r['test_accuracy'])}, macro-F1 {_f(r['test_macro_f1'])}", noise))
        out.append(f"- {who} ({acc}) " + "; ".join(clauses[:-1]) + ("; and " if len(clauses) > 1 else "")
                   + clauses[-1] + ".")
    base = []
    for key, what in (("majority", "the majority-class baseline"),
                      ("bag_of_words", "the bag-of-words reference (TF-IDF + logistic regression)")):
        b = baselines.get(key)
        if b is not None:
            base.append(_versus(s["test_accuracy"], b["accuracy"], what,
                                f"accuracy {_f(b['accuracy'])}, macro-F1 {_f(b['macro_f1'])}", noise))
    if base:
        out.append(f"- On the same {n_test} test passages, {who.lower()} " + " and ".join(base) + ".")
    d_name = next((n for n, r in models.items() if r.get("control") == "dense_plus"), None) or next(
        (n for n, r in models.items() if r.get("stage") == "classify"), None)
    if d_name is not None and d_name != s_name:
        d = models[d_name]
        nz = s["n_nonzero_params"] / d["n_nonzero_params"] - 1
        size = f"{100 * abs(nz):.1f}% {'fewer' if nz <= 0 else 'more'} non-zero parameters"
        sp_s, sp_d = (s.get("speedup") or {}).get(ref), (d.get("speedup") or {}).get(ref)
        speed = f"a model {_f(sp_s / sp_d, 2)}× as fast at batch {ref[1:]}" if ref and sp_s and sp_d else "no speed figure"
        da = s["test_accuracy"] - d["test_accuracy"]
        out.append(f"- Against {d_name}, compression bought {size} and {speed}; it cost {_pts(da)} of test accuracy."
                   if da < 0 else f"- Against {d_name}, compression bought {size}, {speed}, and {_pts(da)} more "
                   f"test accuracy." if da > 0 else f"- Against {d_name}, compression bought {size} and {speed} at "
                   f"the same test accuracy.")
    if n_test:
        out.append(f"- With {n_test} test passages, one standard error of an accuracy near {_f(s['test_accuracy'], 2)} "
                   f"is {_pts(noise / 2)} (binomial); differences below two standard errors ({_pts(noise)}) are marked "
                   f"within noise (passages of one play are not independent, so the true noise is larger).")
    return out


def lineage_steps(models: dict[str, dict], mans: dict[str, dict]) -> dict[str, dict]:
    """Masked-LM and classification steps in all of each model (its own stage's and those it descends from).

    ``mans``: ``{"pretrain", "classify", "distill", <control name>...}`` manifests.
    """
    def st(m: str) -> int:
        man = mans.get(m) or {}
        return int((man.get("metrics") or {}).get("steps") or 0)

    mlm, cls = st("pretrain"), st("classify")
    out = {}
    for n, r in models.items():
        stage, c = r.get("stage"), r.get("control")
        if stage in ("classify", "prune"):
            out[n] = {"mlm": mlm, "cls": cls, "own": cls if stage == "classify" else 0}
        elif stage == "distill":
            out[n] = {"mlm": mlm, "cls": cls + st("distill"), "own": st("distill")}
        elif c == "scratch":
            out[n] = {"mlm": 0, "cls": st(c), "own": st(c)}
        else:
            out[n] = {"mlm": mlm, "cls": cls + st(c), "own": st(c)}
    return out


def classify_controls_table(models: dict[str, dict], baselines: dict[str, dict], steps: dict[str, dict],
                            ref: str | None) -> list[str]:
    """Every evaluated model and the two baselines: steps in all, test accuracy and macro-F1, the student's accuracy
    against each (points, + where the student is better), non-zero parameters and the speed-up against dense."""
    s_name = student_name(models)
    s_acc = models[s_name]["test_accuracy"] if s_name else None
    header = ["model", "what it is", "masked-LM steps", "classification steps", "test accuracy", "macro-F1",
              "student's accuracy vs this", "non-zero params", f"speed-up ({ref or '–'})"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for n, r in models.items():
        st = steps.get(n, {})
        vs = "–" if s_acc is None or n == s_name else f"{100 * (s_acc - r['test_accuracy']):+.1f} pts"
        sp = (r.get("speedup") or {}).get(ref) if ref else None
        lines.append(f"| **{n}** | {role(r)} | {_int(st.get('mlm'))} | {_int(st.get('cls'))} | "
                     f"{_f(r['test_accuracy'])} | {_f(r['test_macro_f1'])} | {vs} | {_int(r['n_nonzero_params'])} | "
                     f"{_f(sp, 2) + '×' if sp else '–'} |")
    for key, name, what in (("majority", "majority baseline", "always the most frequent training label"),
                            ("bag_of_words", "bag of words", "TF-IDF over token ids + logistic regression "
                                                             "(class_weight='balanced'), same train/test passages")):
        b = baselines.get(key)
        if b is not None:
            vs = "–" if s_acc is None else f"{100 * (s_acc - b['accuracy']):+.1f} pts"
            lines.append(f"| {name} | {what} | – | – | {_f(b['accuracy'])} | {_f(b['macro_f1'])} | {vs} | – | – |")
    return lines


def _int(x: Any) -> str:
    return "–" if x is None else f"{int(x):,}"


def control_budget_lines(models: dict[str, dict], mans: dict[str, dict]) -> list[str]:
    """Each control's budget and recipe as its manifest records them."""
    out = []
    for n, r in models.items():
        c = r.get("control")
        man = mans.get(c) or {} if c else {}
        if not man:
            continue
        o, cfg, m = man.get("outputs", {}), man.get("config", {}), man.get("metrics", {})
        masked = (f"; the stage-03 {o.get('method')} masks applied at initialisation and kept through training"
                  if o.get("masks") and c == "scratch" else
                  f"; the stage-03 {o.get('method')} masks kept" if o.get("masks") else "")
        notes = "".join(f"; {x}" for x in o.get("notes", []))
        out.append(f"- **{n}**: {o.get('budget_rule', '?')}, recipe of {o.get('recipe_from', '?')} (LR {cfg.get('lr')}, "
                   f"warmup {cfg.get('warmup_steps')}, {cfg.get('micro_batch_size')} × {cfg.get('grad_accum')} "
                   f"passages per rank and step, precision {m.get('precision')}, world size {m.get('world_size')})"
                   f"{masked}{notes}.")
    return out


def compression_section(run_dir: Path, ev: dict, mans: dict[str, dict]) -> tuple[list[str], list[str]]:
    """``(headline, section)``: the "did compression pay?" lines and the controls section (Markdown lines), from
    stage 05's manifest.

    ``mans``: the ``pretrain`` and ``classify`` manifests; the distill and control manifests are read here.
    """
    from pipeline.controls import control_dir

    mans = dict(mans)
    if (run_dir / "04_distill" / MANIFEST).is_file():
        mans["distill"] = read_manifest(run_dir / "04_distill" / MANIFEST)
    models = ev["metrics"]["models"]
    for r in models.values():
        c = r.get("control")
        if c and (control_dir(run_dir, c) / MANIFEST).is_file():
            mans[c] = read_manifest(control_dir(run_dir, c) / MANIFEST)
    em = ev["metrics"]
    baselines = {"majority": {"accuracy": em["majority_accuracy"], "macro_f1": em.get("majority_macro_f1")}}
    if em.get("bag_of_words"):
        baselines["bag_of_words"] = {"accuracy": em["bag_of_words"]["test_accuracy"],
                                     "macro_f1": em["bag_of_words"]["test_macro_f1"]}
    lat = next(iter(models.values()))["latency_ms"]
    ref = "b1" if "b1" in lat else next(iter(lat), None)
    steps = lineage_steps(models, mans)
    n_test = int(em.get("test_n") or ev["outputs"].get("test_passages") or 0)
    headline = classify_headline_lines(models, baselines, n_test, steps, ref)
    L = ["## Compression against its controls", "",
          "Every model and control scored by stage 05 on the same test passages of the held-out plays; the two "
          "baselines fitted on the same training passages.", "",
          *classify_controls_table(models, baselines, steps, ref), "",
          "Steps: in all, the stages the model descends from included (the masked-LM pretraining, then the "
          "classification steps of stages 02b, 04 or the control). Student's accuracy vs this: the student's test "
          "accuracy minus the row's, in percentage points (+ where the student is better). Speed-up: the dense "
          "classifier's forward latency over the model's at that batch size.", ""]
    budgets = control_budget_lines(models, mans)
    if budgets:
        L += ["Control budgets and recipes, as each control's manifest records them (same data, split, launcher "
              "and DeepSpeed config as the stage whose recipe it copies):", "", *budgets, ""]
    return headline, L


def build_classify_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` (and ``plots/confusion_matrix.png``) and return its path.

    Raises:
        StageError: the classification stage missing (the message names the make target).
    """
    run_dir = Path(run_dir)
    run = run_dir.name
    cls_m = require_stage(run_dir, "classify", run)
    data_m = require_stage(run_dir, "data", run)
    pre_m = require_stage(run_dir, "pretrain", run)
    ev = None
    if (run_dir / "05_eval" / "manifest.json").is_file():
        ev = require_stage(run_dir, "eval", run)
    m, o = cls_m["metrics"], cls_m["outputs"]
    names = o["labels"]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    png = Path(cls_m["_dir"]) / o["confusion_matrix_png"]
    if png.is_file():
        shutil.copyfile(png, plots / "confusion_matrix.png")
    sp = m["splits"]
    pm = pre_m["metrics"]
    headline, compression = ([], []) if ev is None else compression_section(run_dir, ev, {"pretrain": pre_m,
                                                                                          "classify": cls_m})
    L = [f"# Run `{run}`: encoder path (masked-LM pretraining, genre classification, compression)", ""]
    L += ["## Headline", "",
          f"The dense classifier's test accuracy is **{_f(m['test_accuracy'])}** against the majority-class baseline "
          f"{_f(m['majority_accuracy'])} (always '{m['majority_label']}', the most frequent training label); macro-F1 "
          f"**{_f(m['test_macro_f1'])}** (a constant prediction scores "
          f"{_f(1 / len(names) * 2 * m['majority_accuracy'] / (1 + m['majority_accuracy']))}"
          f" at best on these supports), over {m['test_n']} passages of {sp['test']['groups']} plays held out whole.", ""]
    if headline:
        L += ["Did compression pay?", "", *headline, ""]
    L += ["## Data", "",
          f"Corpus {', '.join(o['corpus'])}; tokenizer of stage 01 with [CLS]/[SEP]/[MASK], vocabulary "
          f"{data_m['outputs']['vocab_size']}, sequence length {data_m['outputs']['seq_len']}.  Split by play "
          f"(no play in two splits):", "",
          "| split | plays/groups | passages | per label |", "| --- | ---: | ---: | --- |"]
    for s in ("train", "val", "test"):
        per = ", ".join(f"{k} {v}" for k, v in sorted(sp[s]["per_label"].items()))
        L.append(f"| {s} | {sp[s]['groups']} | {sp[s]['passages']} | {per} |")
    L += ["", "Masked-LM pretraining saw unlabelled scenes of every play, the held-out plays' included (stage 01 "
          "splits scenes, not plays, as BERT's corpus may hold a task's text); no label reached it.", ""]
    L += ["## Stage 02: masked-LM pretraining", "",
          f"{pre_m['outputs']['arch']}, {pre_m['outputs']['n_params']:,} parameters, {pm['steps']} steps, precision "
          f"{pre_m['outputs']['precision']}, ZeRO stage {pre_m['outputs']['zero_stage']}, world size "
          f"{pre_m['outputs']['world_size']} ({pre_m['outputs']['launcher']}).  Validation (a fixed, seeded BERT "
          f"masking of the validation split, {int(pm.get('val_mlm_tokens') or 0)} predicted tokens): masked-LM loss "
          f"{_f(pm['val_loss'])} nats, accuracy {_f(pm.get('val_mlm_accuracy'))}.", ""]
    L += ["## Stage 02b: classification", "",
          f"{o['arch']} from the encoder, {m['steps']} steps, precision {o['precision']}, ZeRO stage {o['zero_stage']}, "
          f"world size {o['world_size']} ({o['launcher']}).  Validation plays: accuracy {_f(m['val_accuracy'])}, "
          f"macro-F1 {_f(m['val_macro_f1'])}.  Test plays (distributed evaluation of the export, every passage "
          f"counted once):", "",
          "| accuracy | majority baseline | macro-F1 | passages |", "| ---: | ---: | ---: | ---: |",
          f"| {_f(m['test_accuracy'])} | {_f(m['majority_accuracy'])} | {_f(m['test_macro_f1'])} | {m['test_n']} |", "",
          *report_table(m["classification_report"], names), "",
          "![confusion matrix](plots/confusion_matrix.png)", ""]
    if ev is not None:
        rows = ev["metrics"]["models"]
        dev = ev["outputs"]["device"]
        bs = list(next(iter(rows.values()))["latency_ms"])
        L += ["## Stages 03-05: the compressed classifier", "",
              f"Same test passages; latency is the median forward time on {dev}"
              + (f" with {ev['outputs']['threads']} thread(s)" if ev["outputs"].get("threads") else "")
              + f" at sequence length {ev['outputs']['seq_len']} (masked weights are stored as zeros: unstructured "
              f"and 2:4 sparsity save no time in dense kernels).", "",
              "| model | accuracy | macro-F1 | params | non-zero | " + " | ".join(f"ms {b}" for b in bs) + " |",
              "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in bs) + " |"]
        for name, r in rows.items():
            L.append(f"| {name} | {_f(r['test_accuracy'])} | {_f(r['test_macro_f1'])} | {r['n_params']:,} | "
                     f"{r['n_nonzero_params']:,} | " + " | ".join(f"{r['latency_ms'][b]:.1f}" for b in bs) + " |")
        bow = ev["metrics"].get("bag_of_words")
        L += ["", f"Majority baseline on the same passages: {_f(ev['metrics']['majority_accuracy'])}"
              + (f"; bag of words (TF-IDF + logistic regression): accuracy {_f(bow['test_accuracy'])}, macro-F1 "
                 f"{_f(bow['test_macro_f1'])}" if bow else "") + ".", ""]
        L += compression
    path = run_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
