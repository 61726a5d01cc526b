"""Issue 15 across stages: inputs checked by identity (item 6), failures named (item 7), a failing --overwrite
evaluation that loses nothing (item 8).  Runs are the real stage scripts on ``test_evaluate.build_run``'s real tiny
models; the disk-full case is a real stage-02 run on a small tmpfs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_evaluate import build_run, load_script, tiny_eval_config
from test_reliability import _Payload

from pipeline.config import parse_cli
from pipeline.manifest import StageError, read_manifest, write_manifest


def _remake_data_manifest(run_dir: Path) -> None:
    """Stage 01 made again (same files, a new manifest): what `make data` after a change does."""
    m = read_manifest(run_dir / "01_data")
    time.sleep(1.1)  # the manifest records the time
    write_manifest(run_dir / "01_data", "data", m["config"], m["outputs"], m["metrics"], wall_time_s=1.0)


def _prune_cfg(root: Path):
    from pipeline.prune import PruneConfig

    return parse_cli(PruneConfig, ["--run", "r", "--results_dir", str(root), "--device", "cpu",
                                   "--eval_tokens", "2000"], "prune")


# 6 -----------------------------------------------------------------------------------------------
def test_stale_or_foreign_inputs_are_refused_by_name(tmp_path, clean_env):
    run_dir = build_run(tmp_path, distill=False)
    prune = load_script("prune")
    _remake_data_manifest(run_dir)
    with pytest.raises(StageError, match=r"stage 'pretrain' \(02_pretrain\) is stale: it was made from another "
                                         r"01_data.*make pretrain RUN=r"):
        prune.main(_prune_cfg(tmp_path))
    assert not (run_dir / "03_prune" / "manifest.json").read_text() == ""  # the old prune output is untouched
    with pytest.raises(StageError, match=r"is stale"):
        load_script("evaluate").main(tiny_eval_config(tmp_path))
    assert not (run_dir / "05_eval").exists()

    # a student whose tokenizer differs from the teacher's at the same vocabulary size
    other = build_run(tmp_path / "o")
    tj = other / "04_distill" / "model" / "tokenizer.json"
    t = json.loads(tj.read_text())
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other text
    tj.write_text(json.dumps(t))
    with pytest.raises(StageError, match=r"the distilled model's tokenizer .*04_distill/model/tokenizer\.json\) differs "
                                         r"from the stage-01 tokenizer"):
        load_script("evaluate").main(tiny_eval_config(tmp_path / "o"))
    from pipeline.distill import DistillConfig, distill

    shutil.copy(tj, other / "03_prune" / "model" / "tokenizer.json")
    cfg = parse_cli(DistillConfig, ["--run", "r", "--results_dir", str(tmp_path / "o"), "--preset", "tiny"], "distill")
    with pytest.raises(StageError, match=r"student tokenizer .* differs from the stage-01 tokenizer"):
        distill(cfg)
    assert not (other / "04_distill" / "checkpoints").exists()


# 7 -----------------------------------------------------------------------------------------------
def test_config_that_disagrees_with_weights_and_pickled_weights_are_named(tmp_path, clean_env):
    run_dir = build_run(tmp_path, prune=None)
    model_dir = run_dir / "02_pretrain" / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    prune = load_script("prune")
    with pytest.raises(StageError, match=r"02_pretrain/model/config\.json disagrees with the weights in .*"
                                         r"model\.safetensors.*make pretrain RUN=r"):
        prune.main(_prune_cfg(tmp_path))
    (model_dir / "config.json").write_text(json.dumps(cfg))
    # a pickle in place of the weights
    ran = tmp_path / "ran"
    sd = {"model.embed_tokens.weight": torch.zeros(2), "payload": _Payload(ran)}
    (model_dir / "model.safetensors").unlink()
    torch.save(sd, model_dir / "pytorch_model.bin")
    with pytest.raises(StageError, match=r"unsafe file: .*pytorch_model\.bin"):
        prune.main(_prune_cfg(tmp_path))
    assert not ran.exists()


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_during_a_checkpoint_is_named(tiny_run, clean_env, tmp_path):
    from test_pretrain import run_stage

    results, run = tiny_run
    small = tmp_path / "small"
    data_kb = sum(p.stat().st_size for p in (results / run / "01_data").rglob("*") if p.is_file()) // 1024
    if not _mount_tmpfs(small, data_kb + 900):  # room for the data and logs, not for a checkpoint (~2.3 MB)
        pytest.skip("needs root to mount a small tmpfs")
    try:
        shutil.copytree(results / run / "01_data", small / run / "01_data")
        with pytest.raises(StageError, match=r"no space left on device while writing checkpoint step2 to "
                                             r".*02_pretrain/checkpoints/step2"):
            run_stage(small, run, "--max_steps", "2", "--save_interval", "2", "--eval_interval", "100")
    finally:
        subprocess.run(["umount", str(small)], check=False)


# 8 -----------------------------------------------------------------------------------------------
def test_failing_overwrite_evaluation_keeps_the_old_output(tmp_path, clean_env):
    run_dir = build_run(tmp_path)
    ev = load_script("evaluate")
    first = ev.main(tiny_eval_config(tmp_path))
    before = {p: (run_dir / "05_eval" / p).read_bytes() for p in ("manifest.json", "results.json", "metrics.jsonl")}
    w = run_dir / "04_distill" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # the distilled weights broken after the first evaluation
    with pytest.raises(Exception):  # noqa: B017 (whatever the loader raises)
        ev.main(tiny_eval_config(tmp_path, overwrite=True, repeats=3))
    after = {p: (run_dir / "05_eval" / p).read_bytes() for p in before}
    assert after == before and first["complete"]
