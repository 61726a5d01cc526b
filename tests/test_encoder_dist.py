"""The classification stage with two real ranks on CPU (gloo): under the ``deepspeed`` launcher (ZeRO-2) and under
``accelerate launch`` (ZeRO-3); the distributed test evaluation counts every passage once and agrees with one process
scoring the export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, free_port, labelled_corpus, make_encoder_stages

from tests.test_pretrain_dist import _check, _env

pytestmark = pytest.mark.dist


@pytest.fixture
def encoder_run(tmp_path, clean_env):
    corpus = labelled_corpus(tmp_path / "labelled.jsonl", n=161)
    common, _ = make_encoder_stages(tmp_path / "results", corpus)
    return tmp_path / "results", corpus, common


def _check_against_one_process(results, corpus, common, launcher, zero_stage):
    from transformers import AutoTokenizer

    from pipeline.classify import (
        ClassifyConfig,
        build_datasets,
        classification_metrics,
        load_classifier,
        predict,
    )
    from pipeline.config import parse_cli
    from pipeline.manifest import read_manifest

    out = results / "r" / "02b_classify"
    m = read_manifest(out)
    o = m["outputs"]
    assert (o["world_size"], o["launcher"], o["zero_stage"]) == (2, launcher, zero_stage)
    cfg = parse_cli(ClassifyConfig, [*common, "--data", str(corpus)], "classify")
    sets, names, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(out / "model"), 32)
    y, logits = predict(load_classifier(out / "model"), sets["test"], 7, "cpu")
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(sets["test"]) and [r["index"] for r in rows] == list(range(len(rows)))
    assert [names[i] for i in logits.argmax(-1)] == [r["prediction"] for r in rows]
    np.testing.assert_allclose(logits, np.array([r["logits"] for r in rows]), atol=1e-4)
    one = classification_metrics(y, logits.argmax(-1), names, sets["train"].labels)
    assert one["report"] == m["metrics"]["classification_report"] and one["accuracy"] == m["metrics"]["test_accuracy"]
    assert sum(m["metrics"]["classification_report"][n]["support"] for n in names) == len(sets["test"])


def test_classify_two_ranks_deepspeed(encoder_run):
    results, corpus, common = encoder_run
    # `python -m`: the workers get this interpreter (a copied venv's launcher scripts may name another one)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
           "scripts/classify.py", *common, "--data", str(corpus), "--ds_config", "ds_configs/zero2_fp16.json",
           "--max_steps", "6", "--eval_interval", "3", "--save_interval", "6", "--progress", "false"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    _check(p)
    _check_against_one_process(results, corpus, common, "deepspeed", 2)


def test_classify_two_processes_accelerate_zero3(encoder_run):
    results, corpus, common = encoder_run
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", "ds_configs/accelerate/zero3.yaml", "--num_processes",
           "2", "--main_process_port", str(free_port()), "scripts/classify.py", *common, "--data", str(corpus),
           "--ds_config", "ds_configs/zero3_fp16.json", "--max_steps", "6", "--eval_interval", "3",
           "--save_interval", "6", "--progress", "false", "--watchdog_s", "120"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    _check(p)
    _check_against_one_process(results, corpus, common, "accelerate", 3)
