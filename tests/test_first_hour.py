"""What a new user tripped over in the first hour (issue 20): each fix checked on real files and real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_data_stage

from pipeline.manifest import StageError, require_stage

ROOT = Path(__file__).resolve().parent.parent


# -- the report's plots read what the stages wrote --------------------------------------------


def test_loss_scale_label_reads_the_precision_each_stage_ran_with():
    from pipeline.report import _precisions

    mans = {"pretrain": {"config": {"precision": "auto"}, "outputs": {"precision": "bf16"}, "metrics": {}},
            "distill": {"config": {"precision": "auto"}, "outputs": {}, "metrics": {"precision": "bf16"}}}
    assert _precisions(mans) == {"pretrain": "bf16", "distill": "bf16"}
    mans["pretrain"]["outputs"] = {}  # nothing recorded: the request is the best there is
    assert _precisions(mans)["pretrain"] == "auto"


def test_distillation_panels_do_not_hide_or_mix_losses(tmp_path):
    from pipeline.report import loss_panels, plot_losses

    rows = [{"step": s, "kd/loss": 2.2 - s / 100, "train/loss": 2.2 - s / 100, "kd/kl": 0.005 + s / 1e4,
             "kd/ce": 4.4 - s / 100} for s in range(0, 50, 10)] + [{"step": 49, "val/loss": 4.4, "val/ppl": 81.0}]
    metrics = {"distill": rows, "pretrain": [{"step": 1, "train/loss": 5.0}, {"step": 2, "val/loss": 4.9}]}
    panels = loss_panels(metrics)
    assert [(s, left, right) for s, _, left, right in panels] == [
        ("pretrain", ("train/loss", "val/loss"), ()),
        ("distill", ("kd/ce", "val/loss"), ()),  # cross-entropy beside cross-entropy
        ("distill", ("kd/loss",), ("kd/kl",)),  # the objective, and the KL term on its own (log) axis
    ]
    assert not any("train/loss" in left for s, _, left, _ in panels if s == "distill")
    assert plot_losses(metrics, tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_plot_of_a_width_pruned_run_uses_size_not_sparsity():
    from pipeline.report import quality_axes

    structured = {"dense": {"linear_sparsity": 0.0, "size_bytes": 2e6}, "pruned": {"linear_sparsity": 0.0,
                                                                                   "size_bytes": 1e6}}
    assert [k for k, _, _ in quality_axes(structured)] == ["size_bytes", "nonzero"]
    structured["pruned"]["linear_sparsity"] = 0.5
    assert [k for k, _, _ in quality_axes(structured)] == ["linear_sparsity", "nonzero"]


# -- own corpus: the prompt and the small-validation warning --------------------------------


def _own_corpus(folder: Path, n_docs: int, words: int) -> None:
    folder.mkdir(parents=True)
    for d in range(n_docs):
        (folder / f"note{d:02d}.txt").write_text(" ".join(f"widget{(d * 7 + i) % 53} gear{i % 11}"
                                                          for i in range(words)) + "\n")


def test_small_validation_split_warns_at_stage_01(tmp_path, capsys):
    _own_corpus(tmp_path / "c", n_docs=8, words=300)
    d = make_data_stage(tmp_path / "results", "own", tmp_path / "c", seq_len=32)
    man = json.loads((d / "manifest.json").read_text())
    assert man["metrics"]["val_tokens"] < 10_000
    assert "validation split has only" in man["outputs"]["val_warning"]
    assert "warning: the validation split has only" in capsys.readouterr().out


def test_prompt_comes_from_the_first_validation_document(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.data import validation_prompt
    from pipeline.tokens import load_tokens

    _own_corpus(tmp_path / "c", n_docs=8, words=300)
    d = make_data_stage(tmp_path / "results", "own", tmp_path / "c", seq_len=32)
    man = json.loads((d / "manifest.json").read_text())
    first_val = json.loads((d / "documents.json").read_text())["val"][0]
    text = next(p for p in (tmp_path / "c").iterdir() if p.name in first_val).read_text()
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    prompt = validation_prompt(tok, load_tokens(d, "val", man), man["outputs"]["eos_id"])
    assert prompt == " ".join(text.split()[:8]) and prompt.startswith("widget")


@pytest.mark.integration
def test_eval_and_report_on_own_text(tmp_path):
    """Stage 05 prompts with the run's validation text, times on CPU by the interleaved protocol, and the report
    names the re-evaluation command that works, the flags, the precision differences and the small split."""
    from test_evaluate import build_run, load_script, tiny_eval_config
    from transformers import AutoTokenizer

    from pipeline.data import validation_prompt
    from pipeline.report import ReportConfig
    from pipeline.tokens import load_tokens

    run = build_run(tmp_path)
    ev = load_script("evaluate").main(tiny_eval_config(tmp_path, threads=0, batch_sizes=[1], seq_lens=[16],
                                                       repeats=3, gen_repeats=2, max_val_tokens=2048))
    out = ev["outputs"]
    data = json.loads((run / "01_data" / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(run / "01_data" / "tokenizer")
    assert out["prompt"] == validation_prompt(tok, load_tokens(run / "01_data", "val", data), data["outputs"]["eos_id"])
    assert out["prompt_source"].startswith("the first words") and "To be, or not to be" not in out["prompt"]
    tp = out["timing_protocol"]
    assert tp["interleaved"] and tp["thread_choice"]["threads"] == out["threads"]
    assert set(tp["thread_choice"]["candidates"]) == {1, os.cpu_count()}
    for row in ev["metrics"].values():
        lat = row["latency"]["b1_t16"]
        assert len(lat["times_ms"]) == 3 and isinstance(lat["flags"], list)
        assert row["gen_tokens_per_s_min"] <= row["gen_tokens_per_s"] <= row["gen_tokens_per_s_max"]
    assert "val_warning" in out and out["val_warning"]  # 2,048 tokens
    text = load_script("report").main(ReportConfig(run="r", results_dir=str(tmp_path))).read_text()
    assert f"Prompt: `{out['prompt']}`" in text
    assert "Small validation split" in text
    assert "CPU timing protocol: the models' repeats ran interleaved" in text
    assert "### Generation" in text
    assert "python scripts/evaluate.py" not in text
    flagged = any(r["latency"]["b1_t16"]["flags"] or r["gen_flags"] for r in ev["metrics"].values())
    assert ("make eval report RUN=r PRESET=cpu FORCE=1" in text) == flagged
    assert "stage 05 val ppl (fp32)" in text  # where the stages' own figures differ, and which one the table uses


# -- re-running one stage, and the hint for a missing stage -----------------------------------


def _make_n(cwd: Path, *args: str) -> str:
    p = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-C", str(cwd), "-n", *args, "PY=python3"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.integration
@pytest.mark.skipif(subprocess.run(["make", "--version"], capture_output=True).returncode != 0, reason="no make")
def test_force_reruns_only_the_named_stage_with_overwrite(tmp_path):
    controls = [f"06_controls/{c}" for c in ("dense_plus", "finetune", "scratch", "scratch_full")]
    for d in ("01_data", "02_pretrain", "03_prune", "04_distill", *controls):
        (tmp_path / "results" / "x" / d).mkdir(parents=True)
        (tmp_path / "results" / "x" / d / "manifest.json").write_text("{}")
        time.sleep(0.02)  # each stage newer than the one it reads (the controls read 04)
    assert "scripts/" not in _make_n(tmp_path, "prune", "RUN=x")  # up to date: nothing to do
    out = _make_n(tmp_path, "prune", "RUN=x", "PRESET=tiny", "FORCE=1", "PRUNE_ARGS=--sparsity 0.7")
    cmds = [ln for ln in out.splitlines() if "scripts/" in ln]
    assert len(cmds) == 1 and "scripts/prune.py" in cmds[0]
    assert "--sparsity 0.7" in cmds[0] and cmds[0].rstrip().endswith("--overwrite") and "--preset tiny" in cmds[0]
    # the report's re-evaluation advice: eval and report alone
    cmds = [ln for ln in _make_n(tmp_path, "eval", "report", "RUN=x", "FORCE=1").splitlines() if "scripts/" in ln]
    assert [c.split()[1] for c in cmds] == ["scripts/evaluate.py", "scripts/report.py"]


@pytest.mark.integration
def test_missing_stage_hint_names_the_preset(tmp_path):
    with pytest.raises(StageError, match=r"`make pretrain RUN=newrun PRESET=tiny`"):
        require_stage(tmp_path / "newrun", "pretrain", "newrun", "tiny")
    with pytest.raises(StageError, match=r"PRESET=<the preset you use"):
        require_stage(tmp_path / "newrun", "eval")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "prune.py"), "--run", "nope", "--preset", "tiny",
                        "--results_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "make pretrain RUN=nope PRESET=tiny" in p.stderr


# -- set-up: a C++ compiler is needed, said before anything runs ------------------------------


@pytest.mark.integration
def test_missing_compiler_is_named_before_deepspeed_builds(tmp_path, monkeypatch):
    from pipeline.preflight import BuildToolsError, check_build_tools

    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(BuildToolsError, match=r"no C\+\+ compiler.*deepspeed_shm_comm.*apt-get install g\+\+"):
        check_build_tools("cpu")
    built = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    check_build_tools("cpu")  # cached: no compiler needed
    p = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), str(tmp_path / "venv")], capture_output=True,
                       text=True, timeout=60, env={"PATH": str(tmp_path), "CXX": "no-such-c++"}, cwd=tmp_path,
                       executable="/bin/bash")
    assert p.returncode == 1 and "no C++ compiler found" in p.stderr and not (tmp_path / "venv").exists()


# -- noise a user reads as trouble ------------------------------------------------------------


@pytest.mark.integration
def test_deepspeed_launcher_is_quiet_on_cpu_and_the_deprecation_is_filtered(tmp_path):
    import warnings

    from pipeline import dist

    cmd = _make_n(tmp_path, "pretrain", "RUN=x", "LAUNCHER=deepspeed", "NGPU=2", "FORCE=1", "DS_ACCELERATOR=cpu")
    assert "deepspeed.launcher.runner" in cmd and "--log_level error" in cmd  # no hostfile / CUDA_VISIBLE_DEVICES info
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist.quiet_known_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
