"""The report of a run, built from stage outputs written by tests/test_evaluate.py's ``build_run``
and a real stage-05 evaluation of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import build_run, load_script, tiny_eval_config

from pipeline.manifest import StageError
from pipeline.report import ReportConfig

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    b = path.read_bytes()
    assert b[:8] == PNG_MAGIC and b[12:16] == b"IHDR"
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


@pytest.mark.integration
def test_report_from_a_full_run(tmp_path):
    run = build_run(tmp_path)
    ev = load_script("evaluate").main(tiny_eval_config(tmp_path, batch_sizes=[1], seq_lens=[16], repeats=1, max_val_tokens=1024))
    path = load_script("report").main(ReportConfig(run="r", results_dir=str(tmp_path)))
    text = path.read_text()
    assert path == run / "report.md"

    # one table row per model, with the perplexities the eval manifest holds
    for name, row in ev["metrics"].items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| **{name}** |"))
        assert f"{row['val_ppl']:,.2f}" in line
        assert f"{row['nonzero']:,}" in line
    assert "No distill stage" not in text

    # plots exist, are PNGs, and are linked by relative paths that resolve from the report's folder
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(p).name for p in links} == {"loss_curves.png", "loss_scale.png", "ppl_vs_sparsity.png"}
    for p in links:
        assert not os.path.isabs(p)
        w, h = _png_size(run / p)
        assert w > 100 and h > 100

    # samples, provenance, tensorboard command
    for sample in ev["outputs"]["samples"].values():
        assert ev["outputs"]["prompt"] + sample in text
    for stage in ("01_data", "02_pretrain", "03_prune", "04_distill", "05_eval"):
        assert f"| {stage} |" in text
    assert f"tensorboard --logdir {run / 'tb'}" in text
    assert "2:4 semi-structured kernels" in text  # CPU run: says why no 2:4 figures
    m = ev["metrics"]
    verdict = "is below" if m["distilled"]["val_ppl"] < m["pruned"]["val_ppl"] else "is **not** below"
    assert f"Distilled perplexity {verdict} the pruned one" in text


@pytest.mark.integration
def test_report_without_distill_says_so(tmp_path):
    run = build_run(tmp_path, distill=False)
    ev = load_script("evaluate").main(tiny_eval_config(tmp_path, batch_sizes=[1], seq_lens=[16], repeats=1, max_val_tokens=1024))
    assert list(ev["metrics"]) == ["dense", "pruned"] and "distill" in ev["outputs"]["missing"]
    text = load_script("report").main(ReportConfig(run="r", results_dir=str(tmp_path))).read_text()
    assert "No distill stage in this run" in text
    assert not any(ln.startswith("| **distilled** |") for ln in text.splitlines())
    assert (run / "plots" / "loss_curves.png").exists()


@pytest.mark.integration
def test_report_refuses_without_eval(tmp_path):
    run = build_run(tmp_path, prune=None)
    with pytest.raises(StageError, match=r"make eval"):
        load_script("report").main(ReportConfig(run="r", results_dir=str(tmp_path)))
    assert not (run / "report.md").exists() and not (run / "plots").exists()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), "--run", "r", "--results_dir",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "make eval" in p.stderr and "Traceback" not in p.stderr
    assert json.loads((run / "02_pretrain" / "manifest.json").read_text())["complete"]


STAGE_SCRIPTS = ("prepare_data", "pretrain", "prune", "distill", "evaluate", "report")


@pytest.mark.slow
@pytest.mark.skipif(not all((ROOT / "scripts" / f"{s}.py").exists() for s in STAGE_SCRIPTS),
                    reason="a stage script is not written yet")
def test_tiny_preset_end_to_end(tmp_path):
    """Every stage of the tiny preset in order, as `make all PRESET=tiny` runs them (plain python launcher)."""
    from conftest import make_corpus

    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    common = ["--run", "e2e", "--preset", "tiny", "--results_dir", str(tmp_path / "results")]
    for script in STAGE_SCRIPTS:
        extra = ["--data", str(corpus)] if script == "prepare_data" else []
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *common, *extra],
                           capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert p.returncode == 0, f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    run = tmp_path / "results" / "e2e"
    ev = json.loads((run / "05_eval" / "manifest.json").read_text())
    m = ev["metrics"]
    assert list(m) == ["dense", "pruned", "distilled"]
    assert m["distilled"]["val_ppl"] < m["pruned"]["val_ppl"]
    assert m["pruned"]["linear_sparsity"] > 0.4 and m["distilled"]["mask_violations"] in (0, None)
    text = (run / "report.md").read_text()
    for name in m:
        assert f"| **{name}** |" in text
    for png in (run / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert (run / "plots" / "loss_curves.png").exists()


def test_main_table_uses_cuda_graph_latency_when_every_model_has_one():
    from pipeline.report import graphed_reference, model_table

    def row(eager, graph=None):
        lat = {"latency_ms": eager, "speedup": 9.99}
        if graph is not None:
            lat.update(latency_graph_ms=graph, speedup_graph=2.0 / graph)
        return {"stage_dir": "s", "val_ppl": 1.0, "params": 1, "nonzero": 1, "linear_sparsity": 0.0, "sparsity": 0.0,
                "size_bytes": 1e6, "sparse_size_bytes": 1e6, "gen_tokens_per_s": 1.0, "latency": {"b1_t8": lat}}

    models = {"dense": row(7.0, 2.0), "pruned": row(5.0, 1.0)}
    assert graphed_reference(models, "b1_t8")
    text = "\n".join(model_table(models, "b1_t8"))
    assert "CUDA graph" in text and "| 1.00 | 2.00× |" in text and "9.99" not in text
    models["pruned"] = row(5.0)  # one model without a graph: eager figures for all
    assert not graphed_reference(models, "b1_t8")
    assert "CUDA graph" not in "\n".join(model_table(models, "b1_t8"))


def test_recipe_line_names_pruning_and_distillation_settings():
    """The report names the recipe that produced its figures, from stages 03/04's recorded configs."""
    from pipeline.report import recipe_line

    mans = {"prune": {"config": {"method": "structured", "sparsity": 0.5, "importance": "activation",
                                 "calib_blocks": 128, "drop_layers": 0}},
            "distill": {"config": {"max_steps": 100, "lr": 6e-4, "warmup_steps": 10, "alpha": 0.5,
                                   "temperature": 2.0, "hidden_mse_weight": 0.0}}}
    line = recipe_line(mans)
    assert "structured at sparsity 0.5 by activation importance, 128 calibration blocks" in line
    assert "100 steps at LR 0.0006" in line and "alpha 0.5" in line and "temperature 2.0" in line
    assert "hidden-state" not in line
    mans["prune"]["config"].update(importance="magnitude")
    assert "calibration" not in recipe_line(mans)
    assert recipe_line({"eval": {}}) is None
