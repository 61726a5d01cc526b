"""Stage 04 tests: KD loss against a direct reference, mask keeping under DeepSpeed, the teacher, the stage."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_llama

from pipeline.distill import count_mask_violations, hidden_mse, kd_loss

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# ---------------------------------------------------------------------------------------------
# KD loss


def _reference_kd(s, t, y, T, alpha, ignore_index=-100):
    """Token-by-token float64 computation written from the formula, no torch.nn.functional."""
    s = s.double().reshape(-1, s.shape[-1])
    t = t.double().reshape(-1, t.shape[-1])
    y = y.reshape(-1)
    kls, ces = [], []
    for i in range(s.shape[0]):
        if int(y[i]) == ignore_index:
            continue
        ps = torch.exp(s[i] / T) / torch.exp(s[i] / T).sum()
        pt = torch.exp(t[i] / T) / torch.exp(t[i] / T).sum()
        kls.append(float((pt * (torch.log(pt) - torch.log(ps))).sum()))
        p1 = torch.exp(s[i]) / torch.exp(s[i]).sum()
        ces.append(-math.log(float(p1[int(y[i])])))
    kl = sum(kls) / len(kls)
    ce = sum(ces) / len(ces)
    return alpha * T * T * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (0.5, 0.0)])
@pytest.mark.parametrize("chunk", [None, 3])
def test_kd_loss_matches_reference(T, alpha, chunk):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g) * 3
    t = torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = -100
    y[1, 4] = -100
    loss, kl, ce = kd_loss(s, t, y, temperature=T, alpha=alpha, chunk_size=chunk)
    rl, rkl, rce = _reference_kd(s, t, y, T, alpha)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(rl, rel=1e-5, abs=1e-6)
    assert kl.item() == pytest.approx(rkl, rel=1e-5, abs=1e-6)
    assert ce.item() == pytest.approx(rce, rel=1e-5, abs=1e-6)


def test_kd_loss_ignores_masked_positions_entirely():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 6, 7, generator=g)
    t = torch.randn(1, 6, 7, generator=g)
    y = torch.randint(0, 7, (1, 6), generator=g)
    y[0, 2:4] = -100
    base = kd_loss(s, t, y, temperature=2.0, alpha=0.5)[0]
    s2, t2 = s.clone(), t.clone()
    s2[0, 2:4] = 1e4 * torch.randn(2, 7)  # garbage at masked positions changes nothing
    t2[0, 2:4] = -1e4
    s2.requires_grad_(True)
    loss = kd_loss(s2, t2, y, temperature=2.0, alpha=0.5)[0]
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    loss.backward()
    assert torch.all(s2.grad[0, 2:4] == 0)
    assert s2.grad[0, 0].abs().sum() > 0


def test_kd_loss_all_masked_is_zero_with_grad():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    y = torch.full((2, 3), -100)
    loss, kl, ce = kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    assert loss.item() == 0.0 and kl.item() == 0.0 and ce.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_loss_low_precision_logits_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    s32 = torch.randn(3, 4, 50, generator=g) * 8
    t32 = torch.randn(3, 4, 50, generator=g) * 8
    y = torch.randint(0, 50, (3, 4), generator=g)
    s = s32.to(dtype).requires_grad_(True)
    t = t32.to(dtype)
    loss, kl, ce = kd_loss(s, t, y, temperature=2.0, alpha=0.5, chunk_size=5)
    # the reference on the same (rounded) values in float64: only fp32 rounding may differ
    rl, rkl, rce = _reference_kd(s.detach().float(), t.float(), y, 2.0, 0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(rl, rel=1e-5)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_kd_loss_gradient_matches_closed_form():
    # d/ds [T^2 KL(pt||ps)] = T (ps - pt) per token; d/ds CE = softmax(s) - onehot; both / n_valid
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, generator=g, dtype=torch.float64).float().requires_grad_(True)
    t = torch.randn(4, 9, generator=g).float()
    y = torch.tensor([1, -100, 3, 8])
    T, a = 3.0, 0.25
    kd_loss(s, t, y, temperature=T, alpha=a, chunk_size=2)[0].backward()
    ps, pt = torch.softmax(s.detach() / T, -1), torch.softmax(t / T, -1)
    onehot = torch.zeros(4, 9)
    onehot[[0, 2, 3], y[[0, 2, 3]]] = 1
    expect = (a * T * (ps - pt) + (1 - a) * (torch.softmax(s.detach(), -1) - onehot)) / 3
    expect[1] = 0
    torch.testing.assert_close(s.grad, expect, rtol=1e-5, atol=1e-6)


def test_kd_loss_rejects_bad_input():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="same vocabulary"):
        kd_loss(s, torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, torch.zeros(2, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, torch.zeros(2, 3, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, s, torch.zeros(2, 4, dtype=torch.long))


def test_kd_loss_identical_models_have_zero_kl():
    s = torch.randn(2, 4, 13)
    y = torch.randint(0, 13, (2, 4))
    loss, kl, ce = kd_loss(s, s.clone(), y, temperature=2.0, alpha=1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-5)


def test_hidden_mse_reference_and_masking():
    g = torch.Generator().manual_seed(4)
    hs = [torch.randn(2, 3, 4, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 3, 4, generator=g) for _ in range(2)]
    valid = torch.tensor([[True, False, True], [True, True, False]])
    got = hidden_mse(hs, ht, valid)
    ref = sum(((a - b)[valid] ** 2).mean() for a, b in zip(hs, ht)) / 2
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert hidden_mse(hs, ht, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="widths differ"):
        hidden_mse([torch.randn(1, 2, 4)], [torch.randn(1, 2, 8)])


# ---------------------------------------------------------------------------------------------
# mask keeping under DeepSpeed: a worker run in a subprocess (this file run as a script)


def _random_masks(model, seed: int = 0, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) >= sparsity
            for n, p in model.named_parameters() if p.dim() == 2 and "layers." in n}


def _mask_worker(configs: list[dict], out_path: str) -> None:
    """Train a masked tiny LLaMA a few steps under each DeepSpeed config; record violations everywhere."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.distill import MaskKeeper

    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank()
    results = []
    for c in configs:
        model = tiny_llama().train()
        masks = _random_masks(model)
        with torch.no_grad():  # a pruned student: zero where the masks say
            for n, p in model.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": c["zero"], "stage3_param_persistence_threshold": 5000},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "bf16": {"enabled": c["precision"] == "bf16"},
              "fp16": {"enabled": c["precision"] == "fp16", "initial_scale_power": 8}}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        if c["mode"] == "keeper_public":  # a DeepSpeed outside the verified range: DeepSpeed's public API only
            import pipeline.compat as compat

            real = compat.version_of
            compat.version_of = lambda lib, real=real: "0.18.0" if lib == "deepspeed" else real(lib)
            compat._logged.discard("masks written into ZeRO's fp32 fragments")
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    keeper = MaskKeeper(engine, masks)
            finally:
                compat.version_of = real
            assert not keeper.internals and {e["kind"] for e in keeper._entries} == {"public"}
            assert "[compat] masks written into ZeRO's fp32 fragments: deepspeed 0.18.0 is outside" in log.getvalue()
            keeper.apply(engine)  # as stage 04 does, before the first step (no optimizer state yet)
        else:
            keeper = MaskKeeper(engine, masks)
        masks = {k: v.to(engine.device) for k, v in masks.items()}
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(c.get("steps", 4)):
            x = torch.randint(0, 128, (2, 17), generator=g).to(engine.device)
            loss = engine(input_ids=x[:, :-1], labels=x[:, 1:]).loss
            engine.backward(loss)
            engine.step()
            if c["mode"] in ("keeper", "keeper_public"):
                keeper.apply(engine)
            elif c["mode"] == "module_only":  # the naive way: zero the module's copy only
                with torch.no_grad():
                    for n, p in engine.module.named_parameters():
                        if n in masks:
                            if hasattr(p, "ds_id"):
                                p.ds_tensor.data.masked_fill_(~_local_mask(p, masks[n].cpu(), rank).to(p.device), 0)
                            else:
                                p.data.masked_fill_(~masks[n], 0)
        params = dict(engine.module.named_parameters())
        # every rank takes part in these collectives
        master = {n: safe_get_full_fp32_param(params[n]) for n in masks}
        exp_avg = {n: safe_get_full_optimizer_state(params[n], "exp_avg") for n in masks}
        exp_avg_sq = {n: safe_get_full_optimizer_state(params[n], "exp_avg_sq") for n in masks}
        if c["zero"] == 3:
            module_sd = engine._zero3_consolidated_16bit_state_dict()
        else:
            module_sd = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        ckpt = Path(out_path).parent / f"ckpt_z{c['zero']}_{c['precision']}_{c['mode']}"
        engine.save_checkpoint(str(ckpt), tag="t")
        torch.distributed.barrier()
        r = {**c}
        if rank == 0:
            fp32_ckpt = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="t")
            fp32_ckpt = {k: v.to(engine.device) for k, v in fp32_ckpt.items()}
            r["module"] = sum(count_mask_violations(module_sd, masks).values())
            r["master"] = sum(count_mask_violations(master, masks).values())
            r["exp_avg"] = sum(count_mask_violations(exp_avg, masks).values())
            r["exp_avg_sq"] = sum(count_mask_violations(exp_avg_sq, masks).values())
            r["checkpoint_fp32"] = sum(count_mask_violations(fp32_ckpt, masks).values())
            # the masked weights did train: the kept ones are not all still zero / unchanged
            r["kept_nonzero"] = int(sum(((module_sd[n] != 0) & masks[n].to(module_sd[n].device)).sum() for n in masks))
            r["exp_avg_nonzero"] = int(sum((exp_avg[n] != 0).sum() for n in masks))
            r["skipped_steps"] = int(engine.skipped_steps)
        results.append(r)
        torch.distributed.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


def _local_mask(p, mask, rank):
    n = p.ds_tensor.numel()
    flat = mask.reshape(-1)
    local = torch.ones(n, dtype=torch.bool)
    lo, hi = min(rank * n, flat.numel()), min((rank + 1) * n, flat.numel())
    local[: hi - lo] = flat[lo:hi]
    return local


def _run_mask_worker(tmp_path: Path, configs: list[dict], nproc: int) -> list[dict]:
    return _run_worker(tmp_path, "--mask-worker", configs, nproc)


_PLACES = ("module", "master", "exp_avg", "exp_avg_sq", "checkpoint_fp32")


def _check_kept(results):
    for r in results:
        where = {k: r[k] for k in _PLACES}
        assert all(v == 0 for v in where.values()), f"pruned weights revived in {r}"
        assert r["kept_nonzero"] > 0 and r["exp_avg_nonzero"] > 0, r


@pytest.mark.dist
def test_mask_kept_single_rank_zero2_zero3_bf16_fp32(tmp_path):
    configs = [{"zero": z, "precision": p, "mode": "keeper"} for z in (2, 3) for p in ("bf16", "fp32")]
    configs.append({"zero": 2, "precision": "bf16", "mode": "module_only"})
    configs.append({"zero": 3, "precision": "fp32", "mode": "none"})
    # the version gate: on an unverified DeepSpeed the same guarantees through DeepSpeed's public API
    configs += [{"zero": z, "precision": p, "mode": "keeper_public"} for z, p in ((2, "bf16"), (3, "fp32"))]
    results = _run_mask_worker(tmp_path, configs, nproc=1)
    _check_kept(results[:4] + results[6:])
    naive, none = results[4], results[5]
    # controls: zeroing only the module's copy leaves the fp32 masters (hence checkpoints) and Adam's
    # state alive; doing nothing revives the weights themselves
    assert naive["module"] == 0 and naive["master"] > 0 and naive["checkpoint_fp32"] > 0 and naive["exp_avg"] > 0
    assert none["module"] > 0 and none["master"] > 0


@pytest.mark.dist
def test_mask_kept_two_ranks_zero2_zero3(tmp_path):
    configs = [{"zero": z, "precision": "bf16", "mode": "keeper"} for z in (2, 3)]
    configs.append({"zero": 3, "precision": "bf16", "mode": "module_only"})
    results = _run_mask_worker(tmp_path, configs, nproc=2)
    _check_kept(results[:2])
    assert results[2]["master"] > 0 and results[2]["checkpoint_fp32"] > 0


def _teacher_worker(configs: list[dict], out_path: str) -> None:
    """Build the teacher per config; compare its logits to the unpartitioned model's; measure its memory."""
    import deepspeed

    from pipeline.distill import prepare_teacher

    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    results = []
    for c in configs:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[c["precision"]]
        ref = tiny_llama(seed=7).to(dtype).eval()
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            want = ref(input_ids=x).logits
        teacher = prepare_teacher(tiny_llama(seed=7), dtype, "cpu", c["zero"], micro_batch_size=2,
                                  zero3_config={"stage3_param_persistence_threshold": 0})
        got = teacher(x).logits
        teacher.measure()
        r = {**c, "max_abs_diff": float((got.float() - want.float()).abs().max()),
             "logits_dtype": str(got.dtype), "requires_grad": any(p.requires_grad for p in teacher.module.parameters()),
             "training": teacher.module.training, "grad_fn": got.grad_fn is not None,
             "full": teacher.param_bytes_full, "per_rank": teacher.param_bytes_per_rank,
             "partitioned": teacher.engine is not None}
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, r)
        results.append(gathered)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


def _run_worker(tmp_path: Path, mode: str, configs: list[dict], nproc: int, accelerator: str = "cpu"):
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "DS_ACCELERATOR": accelerator, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = [str(Path(__file__).resolve()), mode, json.dumps(configs), str(out)]
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [PY, *args]
    else:
        cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.dist
def test_teacher_frozen_and_partitioned_under_zero3(tmp_path):
    configs = [{"zero": 3, "precision": "fp32"}, {"zero": 3, "precision": "bf16"}, {"zero": 2, "precision": "bf16"}]
    results = _run_worker(tmp_path, "--teacher-worker", configs, nproc=2)
    for per_rank in results:
        for r in per_rank:
            tol = 1e-5 if r["precision"] == "fp32" else 0.05
            assert r["max_abs_diff"] <= tol, r
            assert r["logits_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[r["precision"]]
            assert not r["requires_grad"] and not r["training"] and not r["grad_fn"], r
            if r["zero"] == 3:  # each of 2 ranks holds about half the teacher (partitions padded)
                assert r["partitioned"] and r["per_rank"] <= 0.51 * r["full"], r
            else:
                assert not r["partitioned"] and r["per_rank"] == r["full"], r
    assert results[0][0]["full"] == 2 * results[1][0]["full"]  # bf16 halves the bytes



# ---------------------------------------------------------------------------------------------
# the stage end to end: real stage 01 + 02 (scripts/pretrain.py), a stage 03 made here


def _write_prune_stage(run_dir: Path, method: str) -> dict[str, torch.Tensor]:
    """A stage-03 output in the contract's shape (pipeline.sparsity's masks): model dir, masks.safetensors, manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.manifest import write_manifest
    from pipeline.sparsity import apply_masks, compute_masks, save_masks

    pre = run_dir / "02_pretrain"
    model = AutoModelForCausalLM.from_pretrained(pre / "model", dtype=torch.float32)
    masks = compute_masks(model, method, sparsity=0.5)
    apply_masks(model, masks)
    out = run_dir / "03_prune"
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(pre / "model").save_pretrained(out / "model")
    save_masks(masks, out / "masks.safetensors")
    write_manifest(out, "prune", {"method": method}, {"model_dir": "model", "method": method,
                                                      "masks": "masks.safetensors", "sparsity": 0.5,
                                                      "config_hash": method},
                   inputs={"pretrain": pre})
    return masks


def _stage_cmd(script: str, nproc: int, *args: str) -> list[str]:
    bin_dir = Path(PY).parent
    if nproc == 1:
        return [PY, str(ROOT / "scripts" / script), *args]
    return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--no_local_rank", "--master_port",
            str(free_port()), str(ROOT / "scripts" / script), *args]


def _run_stage(script: str, nproc: int, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(_stage_cmd(script, nproc, *args), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode in ok, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc



TINY = ["--preset", "tiny", "--max_steps", "6", "--eval_interval", "3", "--save_interval", "3", "--log_interval", "1",
        "--sample_tokens", "0", "--progress", "false"]


@pytest.fixture(scope="session")
def pretrained_template(tiny_data_template, tmp_path_factory) -> Path:
    """Run ``t`` with a real stage 01 and a real stage 02 (scripts/pretrain.py, tiny preset, fp32), made once."""
    results = tmp_path_factory.mktemp("distill_upstream") / "results"
    shutil.copytree(tiny_data_template, results / "t" / "01_data")
    _run_stage("pretrain.py", 1, "--run", "t", "--results_dir", str(results), "--preset", "tiny",
               "--ds_config", "ds_configs/zero2_fp16.json", "--precision", "fp32", "--progress", "false",
               "--sample_tokens", "0")
    return results / "t"


def _upstream(template: Path, results: Path, run: str, method: str | None) -> dict[str, torch.Tensor]:
    for st in ("01_data", "02_pretrain"):
        shutil.copytree(template / st, results / run / st, ignore=shutil.ignore_patterns("checkpoints"))
    return _write_prune_stage(results / run, method) if method else {}


def _export(d: Path) -> dict[str, torch.Tensor]:
    from pipeline.distill import load_export_state_dict

    return load_export_state_dict(d)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("method,template,precision", [("magnitude", "zero2_fp16.json", "fp32"),
                                                       ("nm", "zero3_fp16.json", "bf16")])
def test_distill_two_ranks_keeps_sparsity_and_recovers(pretrained_template, tmp_path, method, template, precision):
    from pipeline.manifest import read_manifest
    from pipeline.metrics import read_metrics

    results = tmp_path / "results"
    masks = _upstream(pretrained_template, results, "r", method)
    _run_stage("distill.py", 2, "--run", "r", "--results_dir", str(results), *TINY,
               "--ds_config", f"ds_configs/{template}", "--precision", precision)
    out = results / "r" / "04_distill"
    m = read_manifest(out)
    # sparsity is a fact about the export: zeros exactly where the masks say, checked here independently
    export = _export(out / "model")
    assert sum(count_mask_violations(export, masks).values()) == 0
    student = _export(results / "r" / "03_prune" / "model")
    for n, keep in masks.items():
        assert torch.all(export[n][~keep] == 0)
        assert not torch.equal(export[n][keep], student[n][keep]), f"{n} did not train"
    assert m["outputs"]["sparsity_checked"] and m["outputs"]["mask_violations"] == 0
    assert m["outputs"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (out / "masks.safetensors").is_file()
    # distillation recovers: lower validation loss than right after pruning
    assert m["metrics"]["val_loss"] < m["metrics"]["student_val_loss_before"]
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["zero_stage"] == int(template[4])
    assert m["outputs"]["teacher_partitioned"] == (template.startswith("zero3"))
    rows = read_metrics(out / "metrics.jsonl")
    names = {k for r in rows for k in r}
    assert {"kd/loss", "kd/kl", "kd/ce", "val/loss", "val/ppl", "train/loss"} <= names
    assert sum("kd/teacher_val_ppl" in r for r in rows) == 1
    # the model directory loads as it is, with the tokenizer beside it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")


@pytest.mark.slow
def test_distill_resume_equals_straight_run(pretrained_template, tmp_path):
    """Three... here: 4 steps straight == 2 steps, halt (as if killed), resume, 2 more (ZeRO-2, fp32, 1 rank)."""
    results = tmp_path / "results"
    masks = _upstream(pretrained_template, results, "a", "magnitude")
    _upstream(pretrained_template, results, "b", "magnitude")
    common = ["--results_dir", str(results), *TINY, "--max_steps", "4", "--save_interval", "2", "--eval_interval", "2",
              "--ds_config", "ds_configs/zero2_fp16.json", "--precision", "fp32"]
    _run_stage("distill.py", 1, "--run", "a", *common)
    p = _run_stage("distill.py", 1, "--run", "b", *common, "--halt_after_step", "2", ok=(3,))
    assert not (results / "b" / "04_distill" / "manifest.json").exists(), p.stderr[-2000:]
    _run_stage("distill.py", 1, "--run", "b", *common)
    from pipeline.manifest import read_manifest

    ma, mb = read_manifest(results / "a" / "04_distill"), read_manifest(results / "b" / "04_distill")
    assert mb["metrics"]["resumed_from"] and not ma["metrics"]["resumed_from"]
    assert mb["metrics"]["student_val_loss_before"] == ma["metrics"]["student_val_loss_before"]
    assert mb["metrics"]["val_loss"] == pytest.approx(ma["metrics"]["val_loss"], rel=1e-6)
    ea, eb = _export(results / "a" / "04_distill" / "model"), _export(results / "b" / "04_distill" / "model")
    for n in ea:
        torch.testing.assert_close(eb[n], ea[n], rtol=1e-6, atol=1e-7)
    assert sum(count_mask_violations(eb, masks).values()) == 0


@pytest.mark.slow
def test_finished_distill_accepts_run_control_changes(pretrained_template, tmp_path):
    """A finished stage 04 re-run with another run-control setting (--watchdog_s, --foreach_checks) is the same
    run; another KD setting is refused; an output hashed the old way (before the fields were marked) still counts."""
    from pipeline.config import config_hash, legacy_config_hash, parse_cli
    from pipeline.distill import _LEGACY_HASH_IGNORE, DistillConfig
    from pipeline.manifest import read_manifest

    results = tmp_path / "results"
    _upstream(pretrained_template, results, "r", "magnitude")
    args = ["--run", "r", "--results_dir", str(results), *TINY, "--max_steps", "2", "--save_interval", "2",
            "--eval_interval", "2", "--ds_config", "ds_configs/zero2_fp16.json", "--precision", "fp32"]
    _run_stage("distill.py", 1, *args)
    out = results / "r" / "04_distill"
    first = read_manifest(out)
    assert first["outputs"]["config_hash"] == config_hash(parse_cli(DistillConfig, args, "distill", validate=False))
    _run_stage("distill.py", 1, *args, "--watchdog_s", "60", "--foreach_checks", "false")
    assert read_manifest(out)["outputs"]["config_hash"] == first["outputs"]["config_hash"]
    p = _run_stage("distill.py", 1, *args, "--temperature", "3", ok=(2,))
    assert "different run's distill output" in p.stderr and "--overwrite" in p.stderr
    # an output written when distill's hash still held compile/foreach_checks/defer_overflow/watchdog_s
    m = json.loads((out / "manifest.json").read_text())
    old = legacy_config_hash(parse_cli(DistillConfig, args, "distill", validate=False), _LEGACY_HASH_IGNORE)
    assert old != m["outputs"]["config_hash"]
    m["outputs"]["config_hash"] = old
    (out / "manifest.json").write_text(json.dumps(m))
    _run_stage("distill.py", 1, *args)  # (the old hash held watchdog_s: the same value as that run's)
    assert read_manifest(out)["outputs"]["config_hash"] == first["outputs"]["config_hash"]


def _write_structured_stage(run_dir: Path, hidden: int = 32) -> None:
    """A stage-03 'structured' output: a narrower LLaMA (random init) sharing the teacher's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.manifest import write_manifest

    pre = run_dir / "02_pretrain" / "model"
    c = AutoConfig.from_pretrained(pre)
    c.hidden_size, c.intermediate_size = hidden, 96
    torch.manual_seed(0)
    out = run_dir / "03_prune"
    AutoModelForCausalLM.from_config(c).save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(pre).save_pretrained(out / "model")
    write_manifest(out, "prune", {"method": "structured"}, {"model_dir": "model", "method": "structured",
                                                            "masks": None, "sparsity": 0.5, "config_hash": "s"})


@pytest.mark.slow
def test_structured_student_distills_and_hidden_mse_is_refused(pretrained_template, tmp_path):
    results = tmp_path / "results"
    _upstream(pretrained_template, results, "r", None)
    _write_structured_stage(results / "r")
    args = ["--run", "r", "--results_dir", str(results), *TINY, "--ds_config", "ds_configs/zero2_fp16.json",
            "--precision", "fp32"]
    p = _run_stage("distill.py", 1, *args, "--hidden_mse_weight", "0.5", ok=(2,))
    assert "widths" in p.stderr and "--hidden_mse_weight 0" in p.stderr and "Traceback" not in p.stderr
    assert not (results / "r" / "04_distill").exists()
    _run_stage("distill.py", 1, *args)
    from pipeline.manifest import read_manifest

    m = read_manifest(results / "r" / "04_distill")
    assert m["outputs"]["masks"] is None and m["outputs"]["method"] == "structured"
    assert m["metrics"]["val_loss"] < m["metrics"]["student_val_loss_before"]


def test_missing_prune_stage_is_refused_before_writing(tiny_run):
    results, run = tiny_run
    p = _run_stage("distill.py", 1, "--run", run, "--results_dir", str(results), "--preset", "tiny", ok=(2,))
    assert "make pretrain" in p.stderr and "Traceback" not in p.stderr
    assert not (results / run / "04_distill").exists()


def test_distill_config_validation():
    from pipeline.config import ConfigError, parse_cli
    from pipeline.distill import DistillConfig

    cfg = parse_cli(DistillConfig, ["--preset", "tiny"], "distill")
    assert cfg.max_steps == 20 and cfg.precision == "fp32" and cfg.alpha == 0.5
    with pytest.raises(ConfigError) as e:
        parse_cli(DistillConfig, ["--alpha", "1.5", "--temperature", "0", "--hidden_mse_weight", "-1"], "distill")
    msg = str(e.value)
    assert "alpha" in msg and "temperature" in msg and "hidden_mse_weight" in msg



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_kept_fp16_zero2_zero3_gpu(tmp_path):
    """fp16: DeepSpeed's fp32 masters are copied into the fp16 module weights after every step."""
    configs = [{"zero": z, "precision": "fp16", "mode": "keeper", "steps": 6} for z in (2, 3)]
    configs.append({"zero": 2, "precision": "fp16", "mode": "module_only", "steps": 6})
    results = _run_worker(tmp_path, "--mask-worker", configs, nproc=1, accelerator="cuda")
    _check_kept(results[:2])
    assert results[2]["master"] > 0 and results[2]["checkpoint_fp32"] > 0


if __name__ == "__main__":
    if sys.argv[1] == "--mask-worker":
        _mask_worker(json.loads(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "--teacher-worker":
        _teacher_worker(json.loads(sys.argv[2]), sys.argv[3])
    from pipeline import dist

    dist.shutdown()  # every rank
    # no interpreter teardown: a gloo rank aborted there after its work ("terminate called without an active
    # exception", 2026-12-02), which is not what these tests check
    sys.stdout.flush()
    os._exit(0)
