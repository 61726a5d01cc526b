"""Compression controls (pipeline.controls) on the tiny preset: each trains the right architecture for the right
number of steps, through real stages 01-04 made here; stage 05 evaluates them and the report's headline is
computed from the figures, a losing student said to lose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import parse_cli

FAST = ["--progress", "false", "--sample_tokens", "0"]
PRE_STEPS, DIS_STEPS = 6, 3


def _script(name: str):
    from test_evaluate import load_script

    return load_script(name)


def _upstream(tiny_data_template: Path, results: Path, run: str, method: str) -> Path:
    """Real stages 02 (6 steps), 03 (``method``) and 04 (3 steps) of the tiny preset on a copy of the tiny stage 01."""
    from pipeline.distill import DistillConfig
    from pipeline.prune import PruneConfig
    from pipeline.train import TrainConfig

    shutil.copytree(tiny_data_template, results / run / "01_data")
    common = ["--run", run, "--results_dir", str(results), "--preset", "tiny"]
    short = ["--eval_interval", "3", "--save_interval", "3", "--log_interval", "1", "--eval_batch_size", "64"]
    _script("pretrain").main(parse_cli(TrainConfig, [*common, *FAST, *short, "--max_steps", str(PRE_STEPS)],
                                       "pretrain"))
    _script("prune").main(parse_cli(PruneConfig, [*common, "--method", method], "prune"))
    _script("distill").main(parse_cli(DistillConfig, [*common, *FAST, *short, "--max_steps", str(DIS_STEPS)],
                                      "distill"))
    return results / run


def _control(results: Path, run: str, name: str, *extra: str) -> dict:
    from pipeline.controls import ControlConfig

    cfg = parse_cli(ControlConfig, ["--run", run, "--results_dir", str(results), "--preset", "tiny", "--control",
                                    name, "--progress", "false", *extra], "controls")
    return _script("controls").main(cfg)


def _arch(model_dir: Path) -> dict:
    from transformers import AutoConfig

    from pipeline.controls import arch_summary

    return arch_summary(AutoConfig.from_pretrained(model_dir))


def _n_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    from pipeline.model import count_params

    return count_params(AutoModelForCausalLM.from_pretrained(model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_each_control_trains_the_right_model_for_the_right_steps(tiny_data_template, tmp_path, clean_env, method):
    from pipeline.manifest import read_manifest
    from pipeline.metrics import read_metrics
    from pipeline.sparsity import count_mask_violations, load_export_state_dict, load_masks

    results = tmp_path / "results"
    run = _upstream(tiny_data_template, results, "r", method)
    teacher, student = run / "02_pretrain" / "model", run / "03_prune" / "model"
    pre_tokens = read_manifest(run / "02_pretrain")["metrics"]["tokens_seen"]
    mans = {name: _control(results, "r", name) for name in ("dense_plus", "finetune", "scratch", "scratch_full")}
    expected_steps = {"dense_plus": DIS_STEPS, "finetune": DIS_STEPS, "scratch": DIS_STEPS,
                      "scratch_full": PRE_STEPS + DIS_STEPS}
    masks = load_masks(run / "03_prune" / "masks.safetensors") if method == "magnitude" else {}
    assert bool(masks) == (method == "magnitude")
    for name, man in mans.items():
        out = run / "06_controls" / name
        assert read_manifest(out) == json.loads(json.dumps(man, default=str))  # the manifest on disk, complete
        m, o = man["metrics"], man["outputs"]
        # the right number of optimizer steps: in the manifest, the budget and the training log
        assert m["steps"] == expected_steps[name] == m["budget"]["steps"], name
        assert max(r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r) == m["steps"]
        # the right architecture: the teacher's for dense+, the student's (config and parameter count) otherwise
        ref = teacher if name == "dense_plus" else student
        assert _arch(out / "model") == _arch(ref), name
        assert _n_params(out / "model") == _n_params(ref), name
        tokens = m["steps"] * 4 * 64  # tiny preset: 4 sequences of 64 tokens per step
        assert m["tokens_seen"] == tokens == m["budget"]["tokens"]
        descends = name in ("dense_plus", "finetune")
        assert m["budget"]["cumulative"]["tokens"] == tokens + (pre_tokens if descends else 0), name
        assert m["budget"]["cumulative"]["steps"] == m["steps"] + (PRE_STEPS if descends else 0), name
        # the sparsity pattern: kept exactly (finetune as stage 04 keeps it; scratch fixed from initialisation)
        if masks and name != "dense_plus":
            export = load_export_state_dict(out / "model")
            assert sum(count_mask_violations(export, masks).values()) == 0, name
            assert torch.equal(load_masks(out / o["masks"])["model.layers.0.mlp.up_proj.weight"],
                               masks["model.layers.0.mlp.up_proj.weight"])
        else:
            assert o.get("masks") is None
    # scratch starts afresh: its weights share nothing with the student's; finetune starts from them
    s_w = load_export_state_dict(student)
    scr = load_export_state_dict(run / "06_controls" / "scratch" / "model")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(scr[key], s_w[key], atol=1e-2)
    assert mans["finetune"]["config"]["alpha"] == 0.0 and mans["finetune"]["outputs"]["recipe_from"] == "04_distill"
    assert mans["scratch"]["config"]["lr"] == read_manifest(run / "02_pretrain")["config"]["lr"]
    assert "stage 02's 6 + stage 04's 3 = 9 steps" in mans["scratch_full"]["outputs"]["budget_rule"]


@pytest.mark.slow
def test_controls_are_evaluated_and_reported(tiny_data_template, tmp_path, clean_env):
    from test_evaluate import tiny_eval_config

    from pipeline.report import ReportConfig

    results = tmp_path / "results"
    run = _upstream(tiny_data_template, results, "r", "magnitude")
    for name in ("finetune", "scratch"):
        _control(results, "r", name)
    # a control of other options is refused before anything is written; changed upstream replaces it
    from pipeline.manifest import StageError

    before = (run / "06_controls" / "scratch" / "manifest.json").read_bytes()
    with pytest.raises(StageError, match="--overwrite"):
        _control(results, "r", "scratch", "--max_steps", "2")
    assert (run / "06_controls" / "scratch" / "manifest.json").read_bytes() == before
    ev = _script("evaluate").main(tiny_eval_config(results, batch_sizes=[1], seq_lens=[16], repeats=1,
                                                   max_val_tokens=1024))
    assert list(ev["metrics"]) == ["dense", "pruned", "distilled", "finetune", "scratch"]
    assert ev["metrics"]["scratch"]["mask_violations"] == 0
    text = _script("report").main(ReportConfig(run="r", results_dir=str(results))).read_text()
    table = text.split("## Compression against its controls")[1].split("\n\n")[1]
    for name, row in ev["metrics"].items():
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| **{name}** |"))
        assert f"{row['val_ppl']:,.2f}" in line
    s, f = ev["metrics"]["distilled"]["val_ppl"], ev["metrics"]["finetune"]["val_ppl"]
    word = "worse" if s > f else "better"
    assert f"{100 * abs(s / f - 1):.1f}% {word} than fine-tuning the pruned student without the teacher" in text
    assert "the stage-03 magnitude masks applied at initialisation and kept fixed through training" in text
    assert "## Data regime of the pretraining" in text and "tokens per parameter" in text
    assert "recovered" not in text


def _row(ppl: float, nonzero: int, speedup: float, stage: str) -> dict:
    return {"stage": stage, "stage_dir": stage, "val_ppl": ppl, "nonzero": nonzero, "params": 1000,
            "rel_ppl": 0.0, "size_bytes": 4000, "sparse_size_bytes": 4 * nonzero, "linear_sparsity": 0.5,
            "sparsity": 1 - nonzero / 1000, "method": "structured",
            "latency": {"b1_t8": {"latency_ms": 1.0, "speedup": speedup}}}


def _budget(steps: int, cum_steps: int, tokens: int) -> dict:
    return {"metrics": {"steps": steps, "budget": {"steps": steps, "tokens": tokens, "device_s": 1.0, "unit": "CPU-s",
                                                   "cumulative": {"steps": cum_steps, "tokens": tokens,
                                                                  "device_s": 1.0}}}}


def test_headline_says_the_student_loses_when_it_loses():
    """The issue's 124m figures: the distilled student loses to scratch and to dense+, wins 0.1% over finetune."""
    from pipeline.report import controls_table, headline_lines, summary_lines

    models = {"dense": _row(84.8, 1000, 1.0, "pretrain"), "pruned": _row(335.3, 565, 1.6, "prune"),
              "distilled": _row(85.7, 565, 1.6, "distill"), "dense_plus": _row(78.2, 1000, 1.0, "controls"),
              "finetune": _row(85.8, 565, 1.6, "controls"), "scratch": _row(74.8, 565, 1.6, "controls")}
    mans = {"dense": _budget(300, 300, 9), "pruned": _budget(0, 300, 9), "distilled": _budget(100, 400, 12),
            "dense_plus": _budget(100, 400, 12), "finetune": _budget(100, 400, 12), "scratch": _budget(400, 400, 12)}
    text = "\n".join(headline_lines(models, mans, "b1_t8", graphed=False))
    assert "At 1,000 non-zero parameters the best model is **dense+** (perplexity 78.20)" in text
    assert "At 565 non-zero parameters the best model is **scratch** (perplexity 74.80)" in text
    assert "**Compression did not pay off at the student's size**" in text
    # 85.7 / 74.8 - 1 = +14.6%; 85.7 / 85.8 - 1 = -0.1%; 85.7 / 78.2 - 1 = +9.6%
    assert "is 14.6% worse than the same architecture trained from scratch for 400 steps" in text
    assert "0.1% better than fine-tuning the pruned student without the teacher for the same 100 steps" in text
    assert "9.6% worse than the dense model trained 100 steps more instead" in text
    assert "Against dense+, compression bought 43.5% fewer non-zero parameters and a student that runs 1.60× as fast" \
        in text and "it cost 9.6% higher perplexity" in text
    assert "recovered" not in "\n".join(summary_lines(models))
    assert "scratch (74.80)" in "\n".join(summary_lines(models))
    table = "\n".join(controls_table(models, mans, "b1_t8", graphed=False))
    assert "| **scratch** |" in table and "| 400 / 400 |" in table and "| 74.80 | +14.6% |" in table


def test_headline_says_the_student_wins_when_it_wins():
    from pipeline.report import headline_lines

    models = {"dense": _row(80.0, 1000, 1.0, "pretrain"), "distilled": _row(82.0, 500, 2.0, "distill"),
              "finetune": _row(90.0, 500, 2.0, "controls"), "scratch": _row(100.0, 500, 2.0, "controls")}
    mans = {n: _budget(10, 10, 1) for n in models}
    text = "\n".join(headline_lines(models, mans, "b1_t8", graphed=False))
    assert "**Compression paid off at the student's size**" in text
    assert "scratch (whole)" in text and "was not trained in this run" in text  # the missing control is named
    assert "8.9% better than fine-tuning" in text and "18.0% better than the same architecture" in text
    assert "Against dense, compression bought 50.0% fewer non-zero parameters and a student that runs 2.00× as fast" \
        in text and "it cost 2.5% higher perplexity" in text
    no_controls = {k: v for k, v in models.items() if v["stage"] != "controls"}
    assert "**no control models**" in "\n".join(headline_lines(no_controls, mans, "b1_t8", graphed=False))
