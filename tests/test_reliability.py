"""Reliability and security of a run folder (issue 15): one test per numbered finding.

Every run here is the real stage 02 (scripts/pretrain.py's main, in this process, tiny preset, fp32 ZeRO-2 unless
said), on the real tiny stage-01 data of ``conftest.tiny_run``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_pretrain import _fp16_template, losses_by_step, run_stage

from pipeline.config import ConfigError, parse_cli
from pipeline.manifest import StageError
from pipeline.metrics import read_metrics
from pipeline.train import TrainConfig, TrainingHalted

COMMON = ["--eval_interval", "100", "--log_interval", "1", "--keep_last", "0"]


class _Payload:
    """A pickle that runs a shell command when it is loaded (what a planted checkpoint file would do)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _halted_at(results: Path, run: str, step: int, *extra: str) -> Path:
    """Run to ``step`` and stop there as if killed; returns the checkpoints folder."""
    with pytest.raises(TrainingHalted):
        run_stage(results, run, *COMMON, "--save_interval", "2", "--halt_after_step", str(step), *extra)
    return results / run / "02_pretrain" / "checkpoints"


# 1 -----------------------------------------------------------------------------------------------
def test_planted_pickle_never_runs(tiny_run, clean_env, tmp_path):
    results, run = tiny_run
    ckpts = _halted_at(results, run, 2, "--max_steps", "4")
    step2 = ckpts / "step2"
    ran_rng, ran_model = tmp_path / "ran_rng", tmp_path / "ran_model"
    torch.save({"python": _Payload(ran_rng)}, step2 / "rng_state_rank0.pt")  # a planted RNG pickle
    torch.save({"module": _Payload(ran_model)}, step2 / "mp_rank_00_model_states.pt")  # DeepSpeed's model file
    # (a) the model file no longer matches its record: skipped with a warning, the run starts afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = run_stage(results, run, *COMMON, "--save_interval", "2", "--max_steps", "4")
    assert not ran_rng.exists() and not ran_model.exists()
    assert m["outputs"]["resumed_from"] is None
    assert any("mp_rank_00_model_states.pt" in str(w.message) and "does not verify" in str(w.message)
               for w in caught)
    # (b) the marker forged to match the planted file: the safe loader refuses it, nothing runs
    step4 = ckpts / "step4"
    torch.save({"module": _Payload(ran_model)}, step4 / "mp_rank_00_model_states.pt")
    mk = json.loads((step4 / "complete.json").read_text())
    mk["files"]["mp_rank_00_model_states.pt"] = _record(step4 / "mp_rank_00_model_states.pt")
    (step4 / "complete.json").write_text(json.dumps(mk))
    (results / run / "02_pretrain" / "manifest.json").unlink()
    with pytest.raises(StageError, match=r"unsafe file: .*mp_rank_00_model_states\.pt"):
        run_stage(results, run, *COMMON, "--save_interval", "2", "--max_steps", "4")
    assert not ran_rng.exists() and not ran_model.exists()
    # the RNG state is JSON, never a pickle
    assert (step4 / "rng_state_rank0.json").is_file() and not list(step4.glob("rng_state_rank*.pt"))


# 2 -----------------------------------------------------------------------------------------------
def test_truncated_shard_falls_back_to_the_newest_checkpoint_that_verifies(tiny_run, clean_env):
    results, run = tiny_run
    shutil.copytree(results / run / "01_data", results / "straight" / "01_data")
    args = [*COMMON, "--save_interval", "2", "--max_steps", "6"]
    ref = run_stage(results, "straight", *args)
    ckpts = _halted_at(results, run, 4, "--max_steps", "6")
    mk = json.loads((ckpts / "step4" / "complete.json").read_text())
    assert all(set(r) == {"size", "sha256"} for r in mk["files"].values())
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "rng_state_rank0.json"} <= set(mk["files"])
    shard = ckpts / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a half-written shard in a "complete" tag
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = run_stage(results, run, *args)
    msgs = [str(w.message) for w in caught]
    assert any("step4 does not verify" in s and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in s
               and "truncated" in s for s in msgs), msgs
    assert m["outputs"]["resumed_from"].endswith("step2")
    assert m["metrics"]["val_loss"] == pytest.approx(ref["metrics"]["val_loss"], abs=1e-6)


# 3 -----------------------------------------------------------------------------------------------
def test_health_rule_stops_bf16_and_validation_rejects_non_finite_settings(tiny_run, clean_env):
    results, run = tiny_run
    with pytest.raises(StageError, match=r"bf16 training stopped: .*(skipped|non-finite)") as e:
        run_stage(results, run, "--precision", "bf16", "--lr", "1000", "--warmup_steps", "0", "--max_steps", "20",
                  "--log_interval", "5", "--eval_interval", "100", "--save_interval", "100")
    assert "--lr" in str(e.value)
    assert not (results / run / "02_pretrain" / "manifest.json").exists()
    from pipeline.distill import DistillConfig

    with pytest.raises(ConfigError, match="temperature must be a finite number, got inf"):
        parse_cli(DistillConfig, ["--run", run, "--results_dir", str(results), "--preset", "tiny",
                                  "--temperature", "inf"], "distill")
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        parse_cli(TrainConfig, ["--run", run, "--results_dir", str(results), "--preset", "tiny", "--lr", "nan"],
                  "pretrain")


# 4 -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes fp16 on DeepSpeed's CPU accelerator")
def test_fp16_stop_advice_works_and_storm_checkpoints_are_set_aside(tiny_run, clean_env, tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    import pipeline.ds_config as dsc

    resolve = dsc.resolve_precision
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    monkeypatch.setattr(dsc, "resolve_precision", lambda req, dev: ("fp16", None) if req == "fp16" else resolve(req, dev))
    results, run = tiny_run
    args = ["--precision", "fp16", "--ds_config", _fp16_template(tmp_path), "--skip_window", "8",
            "--max_skipped_fraction", "0.5", "--warmup_steps", "0", "--max_steps", "12", "--save_interval", "1",
            "--keep_last", "0", "--log_interval", "1", "--eval_interval", "100"]
    # healthy steps first (lr 2e-3), then a diverging LR from step 3 on (a changed --lr resumes)
    with pytest.raises(TrainingHalted):
        run_stage(results, run, *args, "--lr", "2e-3", "--halt_after_step", "2")
    with pytest.raises(StageError, match="overflowed|non-finite") as e:
        run_stage(results, run, *args, "--lr", "1000")
    assert "--resume auto" in str(e.value)
    ckpts = results / run / "02_pretrain" / "checkpoints"
    aside = sorted(p.name for p in ckpts.glob("step*") if (p / "unhealthy.json").is_file())
    resumable = sorted(p.name for p in ckpts.glob("step*") if (p / "complete.json").is_file())
    # the weights of the step before the first skipped one caused it: that checkpoint is set aside too
    assert aside and "step2" in resumable and all(int(a[4:]) > 2 for a in aside)
    assert all(int(r[4:]) < min(int(a[4:]) for a in aside) for r in resumable)
    # the advice as printed: a lower --lr, then --resume auto
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = run_stage(results, run, *args, "--lr", "1e-3", "--resume", "auto")
    assert any("unhealthy" in str(w.message) for w in caught)
    resumed = int(Path(m["outputs"]["resumed_from"]).name[4:])
    assert resumed == max(int(p[4:]) for p in resumable) and f"step{resumed}" not in aside
    assert m["outputs"]["lr_changed_from"] == 2e-3 and m["config"]["lr"] == 1e-3
    assert m["metrics"]["steps"] == 12
    lr_next = [r["train/lr"] for r in read_metrics(results / run / "02_pretrain" / "metrics.jsonl")
               if r["step"] == resumed + 1 and "train/lr" in r]
    assert len(lr_next) == 1 and 5e-4 < lr_next[0] <= 1e-3  # the new peak LR is the one used


# 8 -----------------------------------------------------------------------------------------------
def _tb_pairs(tb_dir: Path) -> list[tuple[str, int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(tag, ev.step) for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)]


def test_logs_after_resume_hold_each_step_once(tiny_run, clean_env):
    results, run = tiny_run
    args = ["--log_interval", "1", "--keep_last", "0", "--save_interval", "2", "--eval_interval", "2",
            "--max_steps", "6"]
    run_stage(results, run, *args)
    out = results / run / "02_pretrain"
    for tag in ("step6", "step4"):  # resume from the older step2: steps 3..6 run again
        (out / "checkpoints" / tag / "complete.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out / "manifest.json").unlink()
        run_stage(results, run, *args)
        run_stage(results, run, *args)  # a finished stage re-run: resumes at step 6, adds no final row

    def pairs(rows):
        return [(k, r["step"]) for r in rows for k in r if k not in ("step", "time")]

    rows = read_metrics(out / "metrics.jsonl")
    assert len(pairs(rows)) == len(set(pairs(rows))), "a (name, step) pair logged twice"
    assert sorted(losses_by_step(out / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
    assert sum(1 for r in rows if "val/loss" in r and r["step"] == 6) == 1
    tb = _tb_pairs(results / run / "tb" / "pretrain")
    assert len(tb) == len(set(tb)) and ("train/loss", 6) in tb and ("val/loss", 2) in tb


# 9 -----------------------------------------------------------------------------------------------
def test_missing_rank_rng_file_is_named(tiny_run, clean_env):
    from pipeline import checkpoint as ckpt

    results, run = tiny_run
    ckpts = _halted_at(results, run, 2, "--max_steps", "4")
    (ckpts / "step2" / "rng_state_rank0.json").unlink()
    problems = ckpt.verify(ckpts / "step2")
    assert len(problems) == 1 and "rng_state_rank0.json: missing" in problems[0]
    with pytest.warns(UserWarning, match=r"step2 does not verify.*rng_state_rank0\.json"):
        assert ckpt.find_verified_resume(ckpts, "auto") is None
    with pytest.raises(ckpt.CheckpointError, match=r"rng_state_rank0\.json: missing"):
        ckpt.find_verified_resume(ckpts, str(ckpts / "step2"))


def test_batch_refusal_names_where_the_world_size_came_from(monkeypatch):
    from pipeline import dist
    from pipeline.sampler import GlobalBatchSampler

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"world_size 2; world size from WORLD_SIZE=2 set by the torchrun launcher"):
        GlobalBatchSampler(10, 4, 2, 2, 0, seed=0, world_source=dist.world_size_source("torchrun"))


    from pipeline.ds_config import DSConfigError, resolve_ds_config

    t = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero2_fp16.json").read_text())
    t["train_batch_size"] = 8
    with pytest.raises(DSConfigError, match=r"= 4 \(world size from WORLD_SIZE=2 in the environment"):
        resolve_ds_config(t, micro_batch_size=2, grad_accum=1, world_size=2, lr=1e-3, weight_decay=0.0,
                          betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, precision="fp32", zero_stage=2)


@pytest.mark.parametrize("n,micro,accum,world", [(37, 2, 3, 2), (10, 3, 1, 1), (50, 4, 2, 3)])
def test_global_batch_never_straddles_an_epoch(n, micro, accum, world):
    from pipeline.sampler import GlobalBatchSampler

    s = GlobalBatchSampler(n, micro, accum, world, 0, seed=3)
    g = micro * accum * world
    for _ in range(4 * n // g + 3):
        b = s.next_global_batch()
        assert len(b) == g and len(set(b)) == g, b  # no block twice in one global batch


# 5 -----------------------------------------------------------------------------------------------
def test_world_size_route_runs_as_printed_and_zero3_universal_resume_equals_straight(tiny_run, clean_env, tmp_path):
    """The ds_to_universal command the refusal prints runs on this project's checkpoint as printed (no
    --inject_missing_state); a ZeRO-3 universal resume then trains as the straight run does (DeepSpeed 0.19.8 left
    the no-decay group with group 0's weight decay and one Adam step counter shared by the sub-groups).  One rank
    both ways: the 2 -> 1 rank round trip is tests/test_pretrain_dist.py's."""
    import subprocess
    import sys

    from pipeline import checkpoint as ckpt

    results, run = tiny_run
    shutil.copytree(results / run / "01_data", results / "straight" / "01_data")
    shutil.copytree(results / run / "01_data", results / "u" / "01_data")
    args = ["--zero_stage", "3", "--max_steps", "6", "--save_interval", "3", "--eval_interval", "6",
            "--log_interval", "1", "--keep_last", "0", "--weight_decay", "0.5"]
    ref = run_stage(results, "straight", *args)
    with pytest.raises(TrainingHalted):
        run_stage(results, run, *args, "--halt_after_step", "3")
    step3 = results / run / "02_pretrain" / "checkpoints" / "step3"
    with pytest.raises(ckpt.CheckpointError, match=r"`python -m deepspeed.checkpoint.ds_to_universal") as e:
        ckpt.check_world_size(step3, 2, {})
    cmd = str(e.value).split("`")[1].split()
    r = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero3_fp16.json").read_text())
    t["checkpoint"] = {"load_universal": True}
    (tmp_path / "uni.json").write_text(json.dumps(t))
    m = run_stage(results, "u", *args, "--ds_config", str(tmp_path / "uni.json"), "--resume", f"{step3}_universal")
    a, b = (losses_by_step(results / x / "02_pretrain" / "metrics.jsonl") for x in ("straight", "u"))
    for s in (4, 5, 6):
        assert b[s] == pytest.approx(a[s], abs=1e-6), s
    assert m["metrics"]["val_loss"] == pytest.approx(ref["metrics"]["val_loss"], abs=1e-6)
