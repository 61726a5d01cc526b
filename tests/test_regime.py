"""Data-regime diagnostics (pipeline.regime): hand-computed figures, and a real pretraining on a hand-built
corpus whose epochs and tokens per parameter are known in advance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.regime import RegimeTracker, data_regime


def test_data_regime_figures_by_hand():
    r = data_regime(n_params=1000, train_tokens=500, tokens_seen=2500, train_losses=[2.0, 2.2],
                    val_history=[(10, 3.0), (20, 2.5), (30, 2.6)])
    assert r["tokens_per_param"] == 2.5 and r["chinchilla_fraction"] == 2.5 / 20
    assert r["epochs"] == 5.0
    assert r["train_loss"] == pytest.approx(2.1) and r["val_loss"] == 2.6
    assert r["train_val_gap"] == pytest.approx(0.5)
    assert (r["best_val_loss"], r["best_val_step"]) == (2.5, 20)
    assert r["val_rising"] is True
    assert r["warning_kinds"] == ["epochs", "val_rising"]
    assert "5.0 times" in r["warnings"][0] and "more than 4 epochs" in r["warnings"][0]
    assert "rising: 2.6000 at step 30, above its best 2.5000 at step 20" in r["warnings"][1]


def test_data_regime_quiet_when_data_is_plenty_and_loss_falls():
    r = data_regime(1000, 10_000, 4000, [], [(10, 3.0), (20, 2.5), (30, 2.505)])  # +0.005 < rise_tol 0.01
    assert r["epochs"] == 0.4 and not r["val_rising"] and r["warnings"] == []
    assert r["train_loss"] is None and r["train_val_gap"] is None
    once = data_regime(1000, 10_000, 4000, [3.0], [(10, 9.0)])
    assert not once["val_rising"] and once["train_val_gap"] == pytest.approx(6.0)
    assert data_regime(1000, 10_000, 0)["val_loss"] is None
    with pytest.raises(ValueError, match="n_params"):
        data_regime(0, 10, 10)


def test_tracker_gap_uses_losses_since_previous_eval_and_warns_once():
    t = RegimeTracker(n_params=100, train_tokens=50)
    hist = {"step": [5, 10, 15, 20], "loss": [4.0, 3.0, 2.0, 1.0]}
    s1, w1 = t.at_eval(10, 100, 3.5, hist)  # losses of steps 5 and 10
    assert s1["regime/train_val_gap"] == pytest.approx(3.5 - 3.5) and s1["regime/epochs"] == 2.0
    assert s1["regime/tokens_per_param"] == 1.0 and w1 == []
    s2, w2 = t.at_eval(20, 250, 3.6, hist)  # steps 15, 20: mean 1.5; 5 epochs; 3.6 > 3.5 + 0.01
    assert s2["regime/train_val_gap"] == pytest.approx(2.1) and s2["regime/val_rising"] == 1.0
    assert [w.split(" ")[0] for w in w2] == ["the", "validation"]
    _, w3 = t.at_eval(30, 300, 3.7, hist)
    assert w3 == []  # each kind once
    summary = t.summary()
    assert summary["val_history"] == [[10, 3.5], [20, 3.6], [30, 3.7]] and summary["epochs"] == 6.0


def _hand_built_data(template: Path, out: Path, train_blocks: int, seq_len: int) -> int:
    """A stage-01 output whose training split is exactly ``train_blocks`` blocks of ``seq_len`` (plus the one
    shared token): token ids written here by hand, the tokenizer copied from a real stage 01."""
    from pipeline.manifest import read_manifest, write_manifest

    m = read_manifest(template)
    vocab = int(m["outputs"]["vocab_size"])
    out.mkdir(parents=True)
    shutil.copytree(template / m["outputs"]["tokenizer_dir"], out / "tokenizer")
    n_train = train_blocks * seq_len + 1
    train = (np.arange(n_train) * 7 % (vocab - 1) + 1).astype(np.uint16)  # a short repeating pattern
    val = (np.arange(3 * seq_len + 1) * 5 % (vocab - 1) + 1).astype(np.uint16)
    train.tofile(out / "train-00000.bin")
    val.tofile(out / "val-00000.bin")
    outputs = {**m["outputs"], "tokenizer_dir": "tokenizer", "train_shards": ["train-00000.bin"],
               "val_shards": ["val-00000.bin"], "dtype": "uint16", "seq_len": seq_len, "config_hash": "hand"}
    write_manifest(out, "data", {"hand_built": True}, outputs,
                   metrics={"train_tokens": n_train, "val_tokens": len(val), "train_blocks": train_blocks})
    return n_train


@pytest.mark.slow
def test_pretraining_on_a_hand_built_corpus_reports_its_regime(tiny_data_template, tmp_path, capsys, monkeypatch):
    from test_pretrain import run_stage

    from pipeline.metrics import read_metrics
    from pipeline.model import count_params

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PIPELINE_LAUNCHER"):
        monkeypatch.delenv(k, raising=False)
    results = tmp_path / "results"
    seq, blocks, steps, batch = 64, 10, 12, 4
    _hand_built_data(tiny_data_template, results / "h" / "01_data", blocks, seq)
    man = run_stage(results, "h", "--max_steps", str(steps), "--eval_interval", "4", "--save_interval", "12",
                    "--log_interval", "2", "--micro_batch_size", str(batch))
    out = capsys.readouterr().out
    g = man["metrics"]["regime"]
    from transformers import AutoModelForCausalLM

    n = count_params(AutoModelForCausalLM.from_pretrained(results / "h" / "02_pretrain" / "model"))
    tokens = steps * batch * seq  # 3072 tokens over a 640-token split
    assert g["tokens_seen"] == tokens and g["n_params"] == n and g["train_tokens"] == blocks * seq
    assert g["epochs"] == pytest.approx(tokens / (blocks * seq)) == 4.8
    assert g["tokens_per_param"] == pytest.approx(tokens / n)
    assert "epochs" in g["warning_kinds"] and "repeats its training data 4.8 times" in out
    # the figures the log holds: every evaluation's, and the gap from the train losses logged since the previous one
    rows = read_metrics(results / "h" / "02_pretrain" / "metrics.jsonl")
    vals = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert [s for s, _ in vals] == [4, 8, 12] and [s for s, _ in g["val_history"]] == [4, 8, 12]
    last_train = [r["train/loss"] for r in rows if "train/loss" in r and 8 < r["step"] <= 12]
    assert len(last_train) == 2
    assert g["train_val_gap"] == pytest.approx(vals[-1][1] - sum(last_train) / 2)
    assert g["val_rising"] == (vals[-1][1] > min(v for _, v in vals[:-1]) + 0.01)
    epochs_logged = [r["regime/epochs"] for r in rows if "regime/epochs" in r]
    assert epochs_logged == pytest.approx([4 * batch * seq / 640, 8 * batch * seq / 640, 4.8])
    assert any(p.name.startswith("events.out.tfevents") for p in (results / "h" / "tb" / "pretrain").iterdir())
    assert man["metrics"]["budget"]["steps"] == steps and man["metrics"]["budget"]["tokens"] == tokens
    assert math.isfinite(man["metrics"]["budget"]["device_s"]) and man["metrics"]["budget"]["device_s"] > 0
    json.dumps(man)  # the manifest stays JSON
