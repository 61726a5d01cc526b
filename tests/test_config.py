"""Config CLI (presets, files, overrides, every problem at once) and stage manifests."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, parse_cli
from pipeline.data import DataConfig
from pipeline.manifest import StageError, require_stage, write_manifest
from pipeline.metrics import MetricsLogger, read_metrics
from pipeline.presets import PRESETS


def test_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"seed": 5, "data": {"vocab_size": 999, "seq_len": 32}}))
    cfg = parse_cli(DataConfig, ["--preset", "tiny", "--config", str(f), "--seq_len=48", "--local_rank", "3"], "data")
    assert cfg.preset == "tiny" and cfg.val_fraction == PRESETS["tiny"]["data"]["val_fraction"]
    assert (cfg.seed, cfg.vocab_size, cfg.seq_len) == (5, 999, 48)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_cli(DataConfig, ["--vocab_sise", "10", "--seq_len", "abc", "--overwrite", "maybe", "--preset", "huge"], "data")
    msg = str(e.value)
    assert "unknown key 'vocab_sise' (did you mean 'vocab_size'?)" in msg
    assert "'seq_len': expected an integer" in msg and "'overwrite': expected true/false" in msg
    assert "preset 'huge' does not exist" in msg


def test_every_preset_section_uses_known_keys():
    # each preset's data section must parse; other stages' sections are checked by their own tests
    for name in PRESETS:
        cfg = parse_cli(DataConfig, ["--preset", name], "data")
        assert cfg.vocab_size == PRESETS[name]["data"]["vocab_size"]


def test_require_stage_refusals_name_the_make_target(tmp_path):
    with pytest.raises(StageError, match=r"make data RUN=myrun"):
        require_stage(tmp_path / "myrun", "data")
    (tmp_path / "myrun" / "02_pretrain").mkdir(parents=True)
    with pytest.raises(StageError, match=r"incomplete.*make pretrain RUN=myrun"):
        require_stage(tmp_path / "myrun", "pretrain")
    write_manifest(tmp_path / "myrun" / "02_pretrain", "pretrain", {"a": 1}, {"model_dir": "model"}, {"val_loss": 1.0})
    m = require_stage(tmp_path / "myrun", "pretrain")
    assert m["outputs"]["model_dir"] == "model" and m["provenance"]["world_size"] == 1
    assert {"git_commit", "git_dirty", "argv", "packages", "launcher", "seed"} <= set(m["provenance"])
    # the hint carries the preset the run was made with, so following it does not switch presets
    (tmp_path / "tinyrun" / "01_data").mkdir(parents=True)
    write_manifest(tmp_path / "tinyrun" / "01_data", "data", {"preset": "tiny"}, {})
    with pytest.raises(StageError, match=r"`make pretrain RUN=tinyrun PRESET=tiny`"):
        require_stage(tmp_path / "tinyrun", "pretrain")


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb") as log:
        log.log(1, {"train/loss": 2.5, "train/lr": 1e-3})
        log.text(1, "sample", "hello")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["train/loss"] == 2.5 and rows[1]["sample"] == "hello"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    silent = MetricsLogger(tmp_path / "other.jsonl", tmp_path / "tb2", enabled=False)
    silent.log(1, {"x": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_run_control_fields_are_marked_once_and_left_out_of_every_hash():
    """The hash's ignore list comes from the dataclass marks; a subclass redeclaring a field keeps its mark."""
    import dataclasses

    from pipeline.classify import ClassifyConfig
    from pipeline.classify_compress import DistillClassifierConfig, PruneClassifierConfig
    from pipeline.config import config_hash, run_control_fields
    from pipeline.distill import DistillConfig
    from pipeline.prune import PruneConfig
    from pipeline.train import TrainConfig

    train_rc = set(run_control_fields(TrainConfig))
    assert train_rc == {"overwrite", "resume", "halt_after_step", "progress", "compile", "foreach_checks",
                        "defer_overflow", "watchdog_s"}
    for cls in (DistillConfig, ClassifyConfig, DistillClassifierConfig):
        assert set(run_control_fields(cls)) == train_rc, cls
    assert set(run_control_fields(PruneConfig)) == set(run_control_fields(PruneClassifierConfig)) == {
        "overwrite", "device", "eval_batch_size"}
    assert run_control_fields(DataConfig) == ("overwrite",)
    new = {"overwrite": True, "resume": "none", "halt_after_step": 3, "progress": False, "compile": "on",
           "foreach_checks": False, "defer_overflow": False, "watchdog_s": 60.0}
    base = parse_cli(DistillConfig, ["--preset", "tiny"], "distill", validate=False)
    for k, v in new.items():
        assert config_hash(dataclasses.replace(base, **{k: v})) == config_hash(base), k
    # a setting that changes what is computed changes the hash; also_ignore leaves one out on request
    assert config_hash(dataclasses.replace(base, temperature=3.0)) != config_hash(base)
    assert config_hash(dataclasses.replace(base, lr=1.0), also_ignore=("lr",)) == config_hash(base, also_ignore=("lr",))
