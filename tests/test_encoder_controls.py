"""The encoder path's compression controls (pipeline/classify_controls.py) on the encoder-tiny preset: each control
trains the right architecture for the right number of steps, stage 05 scores them with the bag-of-words reference
on exactly the test passages, and the report's headline is computed from the numbers, losses stated as losses."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import ROOT, labelled_corpus, make_encoder_stages

CLS_STEPS, DIS_STEPS = 8, 6


def _arch(config) -> dict:
    d = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "_attn_implementation",
              "attn_implementation"):
        d.pop(k, None)
    return d


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """A whole encoder run up to stage 04 (nm pruning) on a small labelled corpus."""
    import os

    from conftest import DIST_VARS

    from pipeline.classify import ClassifyConfig, run_classify
    from pipeline.classify_compress import (
        DistillClassifierConfig,
        PruneClassifierConfig,
        distill_classifier,
        prune_classifier,
    )
    from pipeline.config import parse_cli

    for k in DIST_VARS:
        os.environ.pop(k, None)
    tmp = tmp_path_factory.mktemp("enc")
    corpus = labelled_corpus(tmp / "labelled.jsonl")
    common, _ = make_encoder_stages(tmp / "results", corpus)
    fast = ["--progress", "false", "--eval_interval", "4", "--save_interval", "4"]
    run_classify(parse_cli(ClassifyConfig, [*common, "--data", str(corpus), "--max_steps", str(CLS_STEPS), "--lr",
                                            "2e-3", *fast], "classify"))
    prune_classifier(parse_cli(PruneClassifierConfig, [*common, "--method", "nm"], "prune"))
    distill_classifier(parse_cli(DistillClassifierConfig, [*common, "--max_steps", str(DIS_STEPS), "--lr", "5e-4",
                                                           *fast], "distill"))
    return tmp / "results" / "r", common


def _train(common, control):
    from pipeline.classify_controls import ClassifierControlConfig, train_classifier_control
    from pipeline.config import parse_cli

    return train_classifier_control(parse_cli(ClassifierControlConfig, [*common, "--control", control, "--progress",
                                                                        "false"], "controls"))


def test_classifier_controls_train_the_right_model_for_the_right_steps(encoder_run):
    from transformers import AutoConfig

    from pipeline.classify import load_classifier
    from pipeline.manifest import read_manifest
    from pipeline.sparsity import count_mask_violations, load_export_state_dict, load_masks

    run, common = encoder_run
    dense_dir, student_dir = run / "02b_classify" / "model", run / "03_prune" / "model"
    masks = load_masks(run / "03_prune" / "masks.safetensors")
    dense, student = load_classifier(dense_dir), load_classifier(student_dir)
    cls_cfg = read_manifest(run / "02b_classify" / "manifest.json")["config"]
    dis_cfg = read_manifest(run / "04_distill" / "manifest.json")["config"]

    # finetune: stage 04 without the teacher, stage 04's steps and recipe, the student's architecture, masks kept
    ft = _train(common, "finetune")
    d = run / "06_controls" / "finetune"
    assert ft["metrics"]["steps"] == DIS_STEPS and ft["config"]["max_steps"] == DIS_STEPS
    assert ft["config"]["alpha"] == 0.0 and ft["config"]["lr"] == dis_cfg["lr"] == 5e-4
    assert ft["outputs"]["teacher_dir"] is None and ft["outputs"]["recipe_from"] == "04_distill"
    assert _arch(AutoConfig.from_pretrained(d / "model")) == _arch(student.config)
    logged = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert any("kd/ce" in r for r in logged) and not any("kd/kl" in r for r in logged)  # no teacher term
    assert sum(count_mask_violations(load_export_state_dict(d / "model"), masks).values()) == 0
    assert (d / "masks.safetensors").is_file() and ft["outputs"]["mask_violations"] == 0

    # dense+: the dense classifier, stage 04's steps and recipe, cross-entropy
    dp = _train(common, "dense_plus")
    d = run / "06_controls" / "dense_plus"
    assert dp["metrics"]["steps"] == DIS_STEPS and dp["config"]["lr"] == dis_cfg["lr"]
    assert dp["outputs"]["init_from"] == str(dense_dir) and dp["outputs"]["masks"] is None
    again = load_classifier(d / "model")
    assert _arch(again.config) == _arch(dense.config)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in dense.parameters())
    # it starts from the dense weights (close to them after 6 steps of a small LR), not from a fresh draw
    w0, w1 = dense.bert.embeddings.word_embeddings.weight, again.bert.embeddings.word_embeddings.weight
    assert not torch.equal(w0, w1) and (w1 - w0).abs().max() < 0.05

    # scratch: the student's architecture, fresh, 02b + 04's steps with 02b's recipe, masks applied and kept
    sc = _train(common, "scratch")
    d = run / "06_controls" / "scratch"
    assert sc["metrics"]["steps"] == CLS_STEPS + DIS_STEPS and sc["config"]["max_steps"] == CLS_STEPS + DIS_STEPS
    assert sc["config"]["lr"] == cls_cfg["lr"] == 2e-3 and sc["outputs"]["recipe_from"] == "02b_classify"
    assert sc["outputs"]["budget_rule"].startswith(f"stage 02b's {CLS_STEPS} + stage 04's {DIS_STEPS}")
    fresh = load_classifier(d / "model")
    assert _arch(fresh.config) == _arch(student.config) and fresh.config.id2label == student.config.id2label
    assert sc["outputs"]["n_params"] == sum(p.numel() for p in student.parameters())
    enc = student.bert.embeddings.word_embeddings.weight
    assert (fresh.bert.embeddings.word_embeddings.weight - enc).abs().mean() > 0.5 * enc.abs().mean()  # not pretrained
    assert sum(count_mask_violations(load_export_state_dict(d / "model"), masks).values()) == 0
    assert sc["outputs"]["sparsity"] == pytest.approx(0.5)
    assert list((run / "tb" / "controls" / "scratch").glob("events.out.tfevents.*"))

    # stage 05 scores every control like the other models, and the bag-of-words reference on the same passages
    from transformers import AutoTokenizer

    from pipeline.classify import bag_of_words_baseline, build_datasets, predict
    from pipeline.classify_compress import EvalClassifierConfig, classify_config_of, evaluate_classifiers
    from pipeline.config import parse_cli
    from pipeline.report_classify import build_classify_report

    em = evaluate_classifiers(parse_cli(EvalClassifierConfig, common, "eval"))
    models = em["metrics"]["models"]
    assert list(models) == ["dense", "pruned (nm)", "distilled (nm)", "dense+", "finetune", "scratch"]
    assert [models[n]["control"] for n in ("dense+", "finetune", "scratch")] == ["dense_plus", "finetune", "scratch"]
    sets, names, _ = build_datasets(classify_config_of(read_manifest(run / "02b_classify" / "manifest.json")),
                                    AutoTokenizer.from_pretrained(dense_dir), 32)
    y, logits = predict(fresh, sets["test"], 7, "cpu")
    assert models["scratch"]["test_accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == y)))
    assert models["scratch"]["n_nonzero_params"] == models["distilled (nm)"]["n_nonzero_params"]
    assert models["dense+"]["n_params"] == models["dense"]["n_params"] and "b1" in models["scratch"]["speedup"]
    bow = em["metrics"]["bag_of_words"]
    ref = bag_of_words_baseline(sets["train"], sets["test"], names)
    assert bow["n"] == len(sets["test"]) == em["metrics"]["test_n"] and bow["test_accuracy"] == ref["accuracy"]

    text = build_classify_report(run).read_text()
    assert "## Compression against its controls" in text and "Did compression pay?" in text
    for row in ("| **dense+** |", "| **finetune** |", "| **scratch** |", "| bag of words |", "| majority baseline |"):
        assert row in text
    assert "Compression paid off at the student's size" in text or "Compression did not pay off" in text
    assert f"stage 02b's {CLS_STEPS} + stage 04's {DIS_STEPS}" in text


def _row(stage, acc, f1, nz, control=None, speed=1.0):
    return {"stage": stage, "control": control, "test_accuracy": acc, "test_macro_f1": f1, "n_nonzero_params": nz,
            "speedup": {"b1": speed}}


def _models(distilled=0.40, finetune=0.38, scratch=0.45, dense_plus=0.50):
    return {"dense": _row("classify", 0.48, 0.40, 1000), "pruned (nm)": _row("prune", 0.30, 0.20, 600),
            "distilled (nm)": _row("distill", distilled, 0.30, 600, speed=1.1),
            "dense+": _row("controls", dense_plus, 0.45, 1000, "dense_plus"),
            "finetune": _row("controls", finetune, 0.28, 600, "finetune"),
            "scratch": _row("controls", scratch, 0.35, 600, "scratch")}


STEPS = {"distilled (nm)": {"mlm": 30, "cls": 36}, "finetune": {"mlm": 30, "cls": 36}, "scratch": {"mlm": 0, "cls": 36},
         "dense+": {"mlm": 30, "cls": 36}}


def test_headline_says_when_the_student_loses():
    from pipeline.report_classify import classify_controls_table, classify_headline_lines

    base = {"majority": {"accuracy": 0.25, "macro_f1": 0.07}, "bag_of_words": {"accuracy": 0.42, "macro_f1": 0.33}}
    text = "\n".join(classify_headline_lines(_models(), base, 400, STEPS, "b1"))
    assert "**Compression did not pay off at the student's size**: scratch" in text
    assert "the student loses by 5.0 points" in text
    assert ("**loses to** its architecture trained from scratch without masked-LM pretraining for 36 classification "
            "steps by 5.0 points (scratch: accuracy 0.4500, macro-F1 0.3500)") in text
    assert ("beats fine-tuning the pruned student without the teacher for the same 36 classification steps in all by "
            "2.0 points (finetune: accuracy 0.3800, macro-F1 0.2800; within noise)") in text
    assert ("**loses to** the dense classifier (1,000 non-zero parameters) trained longer instead by 10.0 points "
            "(dense+: accuracy 0.5000") in text
    assert "beats the majority-class baseline by 15.0 points" in text
    assert "**loses to** the bag-of-words reference (TF-IDF + logistic regression) by 2.0 points" in text
    assert "it cost 10.0 points of test accuracy" in text and "40.0% fewer non-zero parameters" in text
    assert "one standard error" in text and "2.4 points" in text  # sqrt(0.4 * 0.6 / 400)
    table = "\n".join(classify_controls_table(_models(), base, STEPS, "b1"))
    assert "| **scratch** | the student's architecture from a fresh initialisation" in table
    assert "| 0 | 36 | 0.4500 | 0.3500 | -5.0 pts | 600 | 1.00× |" in table
    assert "| bag of words |" in table and "| 0.4200 | 0.3300 | -2.0 pts |" in table

    win = "\n".join(classify_headline_lines(_models(distilled=0.47), base, 400, STEPS, "b1"))
    assert "**Compression paid off at the student's size**" in win and "loses to** its architecture" not in win
    assert "beats the bag-of-words reference" in win and "beats its architecture trained from scratch" in win
    # the teacher adding nothing is a tie, not a win
    tie = "\n".join(classify_headline_lines(_models(distilled=0.38), base, 400, STEPS, "b1"))
    assert "ties with fine-tuning the pruned student without the teacher" in tie
    even = "\n".join(classify_headline_lines(_models(distilled=0.45), base, 400, STEPS, "b1"))
    assert "**Compression did not pay off at the student's size**: the distilled student only ties with scratch" in even
    assert "paid off" not in even
    none = "\n".join(classify_headline_lines({k: v for k, v in _models().items() if v["stage"] != "controls"}, base,
                                             400, STEPS, "b1"))
    assert "no control models" in none and "**loses to** the bag-of-words reference" in none


def test_bag_of_words_is_fitted_on_train_and_scored_on_exactly_the_test_passages():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from pipeline.classify import ClassificationDataset, Passage, bag_of_words_baseline

    rng = random.Random(0)

    def passages(n, tag):  # label a: token 7 appears, label b: token 8; filler tokens 10..40
        out = []
        for i in range(n):
            lab = "ab"[i % 2]
            ids = [rng.randrange(10, 40) for _ in range(12)]
            ids[rng.randrange(12)] = 7 if lab == "a" else 8
            out.append(Passage(ids + [99] * 20, lab, f"{tag}{i}"))  # id 99 lies beyond seq_len - 2: never seen
        return out

    kw = dict(label2id={"a": 0, "b": 1}, seq_len=14, cls_id=1, sep_id=2, pad_id=0)
    train, test = ClassificationDataset(passages(60, "tr"), **kw), ClassificationDataset(passages(21, "te"), **kw)
    m = bag_of_words_baseline(train, test, ["a", "b"])
    assert m["n"] == 21 and len(m["predictions"]) == 21 and m["accuracy"] == 1.0
    assert m["features"] == len({t for p in train.passages for t in p.ids[:12]})  # the ids the classifier sees
    # the same fit by hand on the same token-id documents gives the same predictions, in test order
    vec = TfidfVectorizer(token_pattern=r"\S+", lowercase=False)
    x = vec.fit_transform([" ".join(map(str, p.ids[:12])) for p in train.passages])
    clf = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0).fit(x, train.labels)
    flipped = ClassificationDataset([Passage(p.ids, "ba"[["a", "b"].index(p.label)], p.group) for p in test.passages],
                                    **kw)
    want = clf.predict(vec.transform([" ".join(map(str, p.ids[:12])) for p in test.passages]))
    assert m["predictions"] == want.tolist()
    # scored against the test labels: flipping them flips the accuracy
    assert bag_of_words_baseline(train, flipped, ["a", "b"])["accuracy"] == 0.0


@pytest.mark.dist
def test_scratch_control_two_ranks_deepspeed_keeps_the_masks(encoder_run):
    """The control through the deepspeed launcher on two gloo ranks (ZeRO-2): the masks hold on the export."""
    import subprocess
    import sys

    from conftest import free_port

    from pipeline.manifest import read_manifest
    from pipeline.sparsity import count_mask_violations, load_export_state_dict, load_masks
    from tests.test_pretrain_dist import _check, _env

    run, common = encoder_run
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(free_port()), "scripts/controls_classifier.py", *common, "--control", "scratch", "--max_steps", "4",
           "--ds_config", "ds_configs/zero2_fp16.json", "--overwrite", "--resume", "none", "--progress", "false"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    _check(p)
    d = run / "06_controls" / "scratch"
    m = read_manifest(d / "manifest.json")
    assert (m["outputs"]["world_size"], m["outputs"]["launcher"], m["outputs"]["zero_stage"]) == (2, "deepspeed", 2)
    assert m["metrics"]["steps"] == 4 and m["outputs"]["budget_rule"] == "4 steps (--max_steps)"
    masks = load_masks(run / "03_prune" / "masks.safetensors")
    assert sum(count_mask_violations(load_export_state_dict(d / "model"), masks).values()) == 0
