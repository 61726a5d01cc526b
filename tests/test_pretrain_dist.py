"""Stage 02 with two real ranks under the ``deepspeed`` launcher on CPU (``DS_ACCELERATOR=cpu``, gloo).

- ZeRO-2 (fp32) and ZeRO-3 (``--precision auto`` -> bf16 on CPU, fp32 where the CPU has no native bf16) train the tiny preset, the loss falls,
  the manifest records world size 2 and the launcher, and the exported model scores the validation split
  as the engine did.
- A 2-rank checkpoint refuses to resume in one process, naming both sizes and the conversion route.
- The data-parallel gradient equals one process's gradient on the same global batch (ZeRO-2 and ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

from pipeline.manifest import read_manifest
from pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PIPELINE_LAUNCHER",
            "CROSS_RANK", "LOCAL_SIZE")

pytestmark = pytest.mark.dist


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _deepspeed(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # a free port: the launcher's default 29500 may be taken by another job on a shared machine
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "auto")])
def test_two_ranks_train_and_export(tiny_run, stage, precision):
    from pipeline.ds_config import resolve_precision

    expect = resolve_precision(precision, "cpu")[0]  # auto: bf16, or fp32 on a CPU without native bf16
    template = f"ds_configs/zero{stage}_fp16.json"
    results, run = tiny_run
    p = _deepspeed("scripts/pretrain.py", "--run", run, "--results_dir", str(results), "--preset", "tiny",
                   "--ds_config", template, "--precision", precision, "--max_steps", "16", "--log_interval", "2",
                   "--eval_interval", "8", "--save_interval", "8", "--sample_tokens", "4", "--progress", "false")
    _check(p)
    out = results / run / "02_pretrain"
    m = read_manifest(out)
    o = m["outputs"]
    assert (o["world_size"], o["launcher"], o["precision"]) == (2, "deepspeed", expect)
    assert o["zero_stage"] == stage
    if precision == "auto":
        assert expect in o["precision_note"] and o["precision_note"] in p.stdout + p.stderr  # the one logged line
    losses = [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0
    assert json.loads((out / "ds_config.resolved.json").read_text())["train_batch_size"] == 8
    ckpt = out / "checkpoints" / "step16"
    assert (ckpt / "complete.json").is_file()
    assert (ckpt / "rng_state_rank0.json").is_file() and (ckpt / "rng_state_rank1.json").is_file()
    files = json.loads((ckpt / "complete.json").read_text())["files"]  # each rank hashed its own files
    assert {"rng_state_rank0.json", "rng_state_rank1.json"} <= set(files) and any("pp_rank_1_" in f for f in files)

    from transformers import AutoModelForCausalLM

    from pipeline.tokens import BlockDataset, load_tokens
    from pipeline.train import evaluate

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    val = BlockDataset(load_tokens(results / run / "01_data", "val"), 64)
    loss, _, _ = evaluate(model, val, batch_size=4, device="cpu")
    # fp32: the same number; bf16: the engine scored with bf16 weights, the export holds the fp32 masters
    assert loss == pytest.approx(m["metrics"]["val_loss"], rel=1e-5 if expect == "fp32" else 2e-2)

    if expect == "fp32":  # a 2-rank checkpoint in one process: refused before anything is written
        before = (out / "metrics.jsonl").read_text()
        q = subprocess.run([sys.executable, "scripts/pretrain.py", "--run", run, "--results_dir", str(results),
                            "--preset", "tiny", "--ds_config", template, "--precision", precision, "--max_steps",
                            "16", "--log_interval", "2", "--eval_interval", "8", "--save_interval", "8",
                            "--sample_tokens", "4", "--progress", "false"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert q.returncode == 2, q.stderr[-3000:]
        assert "written by 2 rank(s), this run has 1" in q.stderr and "ds_to_universal" in q.stderr
        assert "Traceback" not in q.stderr
        assert (out / "manifest.json").is_file() and (out / "metrics.jsonl").read_text() == before


GRAD_SCRIPT = textwrap.dedent('''
    import copy, json, os, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from deepspeed.utils import safe_get_full_grad
    from pipeline import dist
    from pipeline.ds_config import resolve_ds_config
    from pipeline.engine import build_engine, init_distributed
    from pipeline.manifest import read_manifest
    from pipeline.model import ModelConfig, build_model
    from pipeline.sampler import GlobalBatchSampler
    from pipeline.train import TrainData, causal_lm_loss

    data_dir, out = sys.argv[1], sys.argv[2]
    launcher = init_distributed()
    rank, world = dist.rank(), dist.world_size()
    m = read_manifest(data_dir)
    m["_dir"] = data_dir
    data = TrainData.from_manifest(m)
    vocab = m["outputs"]["vocab_size"]
    result = {}
    for stage in (2, 3):
        model = build_model(ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128), vocab, data.seq_len,
                            seed=0)
        ref = copy.deepcopy(model)
        adamw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        cfg = resolve_ds_config(sys.argv[3] + "/ds_configs/zero2_fp16.json", micro_batch_size=2, grad_accum=2,
                                world_size=world, grad_clip=0.0, precision="fp32", zero_stage=stage, **adamw)
        eng = build_engine(model, cfg, "fp32", lambda s: 1.0, adamw, launcher)
        sampler = GlobalBatchSampler(len(data.train), 2, 2, world, rank, seed=0)
        gb = sampler.next_global_batch()
        micro = sampler.rank_micro_batches(gb)
        for k, idx in enumerate(micro):
            loss, _ = causal_lm_loss(eng, torch.stack([data.train[i] for i in idx]))
            eng.backward(loss)
            if k < len(micro) - 1:
                eng.step()
        grads = {n: safe_get_full_grad(p) for n, p in eng.module.named_parameters()}  # collective
        eng.step()
        # one process, the whole global batch at once
        loss, _ = causal_lm_loss(ref, torch.stack([data.train[i] for i in gb]))
        loss.backward()
        worst = 0.0
        for n, p in ref.named_parameters():
            g = grads[n].float().cpu()
            worst = max(worst, float((g - p.grad).abs().max() / p.grad.abs().max()))
        result[stage] = {"worst_rel_err": worst, "n_params": len(grads), "samples": len(gb)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.shutdown()  # every rank
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: a gloo rank can abort there after its work (pipeline.dist.shutdown)
''')


def test_data_parallel_gradient_equals_single_process(tiny_run, tmp_path):
    results, run = tiny_run
    script = tmp_path / "grad_check.py"
    script.write_text(GRAD_SCRIPT)
    out = tmp_path / "grads.json"
    _check(_deepspeed(str(script), str(results / run / "01_data"), str(out), str(ROOT)))
    res = json.loads(out.read_text())
    for stage in ("2", "3"):
        assert res[stage]["samples"] == 8 and res[stage]["n_params"] > 5
        assert res[stage]["worst_rel_err"] < 1e-5, res


def test_accelerate_two_processes_zero3_train_and_export(tiny_run):
    """``accelerate launch`` with 2 processes and ZeRO-3 runs to the end and exports.

    Regression: Accelerate registers its DeepSpeed config with transformers, so the export's model copy, made
    on rank 0 only, was built inside the collective ``deepspeed.zero.Init`` and waited forever (seen on an H200
    and here).  A watchdog turns a hang into printed stacks and the timeout into a failure."""
    results, run = tiny_run
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "ds_configs/accelerate/zero3.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "scripts/pretrain.py", "--run", run,
           "--results_dir", str(results), "--preset", "tiny", "--ds_config", "ds_configs/zero3_fp16.json",
           "--max_steps", "6", "--log_interval", "2", "--eval_interval", "3", "--save_interval", "6",
           "--sample_tokens", "4", "--progress", "false", "--watchdog_s", "60"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    _check(p)
    out = results / run / "02_pretrain"
    m = read_manifest(out)
    o = m["outputs"]
    assert (o["world_size"], o["launcher"], o["backend"], o["zero_stage"]) == (2, "accelerate", "accelerate", 3)

    from transformers import AutoModelForCausalLM

    from pipeline.tokens import BlockDataset, load_tokens
    from pipeline.train import evaluate

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loss, _, _ = evaluate(model, BlockDataset(load_tokens(results / run / "01_data", "val"), 64), 4, "cpu")
    assert loss == pytest.approx(m["metrics"]["val_loss"], rel=2e-2)  # bf16 engine, fp32 export


def test_zero3_two_ranks_to_one_through_the_printed_universal_route(tiny_run, tmp_path):
    """Issue 15 item 5: a 2-rank ZeRO-3 checkpoint, converted by the command the 1-rank refusal prints, resumes in
    one process (grad_accum 2: the same global batch) and trains as the straight 1-rank run does."""
    from pipeline.checkpoint import CheckpointError, check_world_size

    results, run = tiny_run
    for name in ("straight", "u"):
        shutil.copytree(results / run / "01_data", results / name / "01_data")
    common = ["--preset", "tiny", "--ds_config", "ds_configs/zero3_fp16.json", "--precision", "fp32", "--max_steps",
              "8", "--save_interval", "4", "--eval_interval", "8", "--log_interval", "1", "--sample_tokens", "0",
              "--progress", "false", "--keep_last", "0", "--results_dir", str(results)]
    p = _deepspeed("scripts/pretrain.py", "--run", run, *common, "--halt_after_step", "4")
    step4 = results / run / "02_pretrain" / "checkpoints" / "step4"
    assert p.returncode != 0 and (step4 / "complete.json").is_file(), p.stderr[-3000:]  # halted (rc 3) after step 4
    with pytest.raises(CheckpointError) as e:
        check_world_size(step4, 1, {})
    cmd = str(e.value).split("`")[1].split()
    _check(subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300))
    t = json.loads((ROOT / "ds_configs" / "zero3_fp16.json").read_text())
    t["checkpoint"] = {"load_universal": True}
    (tmp_path / "uni.json").write_text(json.dumps(t))
    one = [sys.executable, "scripts/pretrain.py", *common, "--grad_accum", "2"]
    _check(subprocess.run([*one, "--run", "straight"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600))
    _check(subprocess.run([*one, "--run", "u", "--ds_config", str(tmp_path / "uni.json"), "--resume",
                           f"{step4}_universal"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600))

    def losses(r):
        return {x["step"]: x["train/loss"] for x in read_metrics(results / r / "02_pretrain" / "metrics.jsonl")
                if "train/loss" in x}

    a, b = losses("straight"), losses("u")
    for s in range(5, 9):
        assert b[s] == pytest.approx(a[s], abs=1e-5), s
    assert read_manifest(results / "u" / "02_pretrain")["metrics"]["val_loss"] == pytest.approx(
        read_manifest(results / "straight" / "02_pretrain")["metrics"]["val_loss"], abs=1e-5)
