"""The encoder path's report: ``results/<run>/report.md`` from what stages 01-05 (02b included) wrote.

Sections: the data and the split by play, masked-LM pretraining (loss and accuracy on the fixed validation
masking), the classifier on the held-out plays (accuracy beside the majority-class baseline, macro-F1, the
per-class report, the confusion matrix), and the compressed classifiers (accuracy, macro-F1, parameters,
latency).  Measures nothing; only reads manifests and logs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.manifest import require_stage


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
    L = [f"# Run `{run}`: encoder path (masked-LM pretraining, genre classification, compression)", ""]
    L += ["## Headline", "",
          f"Test accuracy **{_f(m['test_accuracy'])}** against the majority-class baseline {_f(m['majority_accuracy'])} "
          f"(always '{m['majority_label']}', the most frequent training label); macro-F1 **{_f(m['test_macro_f1'])}** "
          f"(a constant prediction scores {_f(1 / len(names) * 2 * m['majority_accuracy'] / (1 + m['majority_accuracy']))}"
          f" at best on these supports), over {m['test_n']} passages of {sp['test']['groups']} plays held out whole.", ""]
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
        L += ["", f"Majority baseline on the same passages: {_f(ev['metrics']['majority_accuracy'])}.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
