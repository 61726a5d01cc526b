"""The engine's speed measures keep the numbers: multi-tensor overflow/norm checks against DeepSpeed's own
loops, the compiled loss against the eager one, the compile policy, and the benchmark's CPU smoke mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from pipeline.train import compile_policy, compiled_token_cross_entropy, token_cross_entropy


def _cpu_zero2_engine(template: str = "zero2_bf16"):
    """A one-rank ZeRO bf16 DeepSpeed engine (``template``) on CPU over a tiny LLaMA, after one backward
    (gradients reduced)."""
    from pipeline.ds_config import resolve_ds_config
    from pipeline.engine import build_engine, init_distributed
    from pipeline.model import ModelConfig, build_model

    launcher = init_distributed()
    model = build_model(ModelConfig(arch="llama", n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=192), 128, 32,
                        seed=0)
    cfg = resolve_ds_config(template, micro_batch_size=2, grad_accum=1, world_size=1, lr=1e-3, weight_decay=0.1,
                            betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, precision="bf16")
    engine = build_engine(model, cfg, "bf16", lambda s: 1.0,
                          dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), launcher)
    batch = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    out = engine(input_ids=batch[:, :-1]).logits
    engine.backward(token_cross_entropy(out, batch[:, 1:]))
    return engine


def _assert_norm_agrees(opt, ds_class, grads, params) -> None:
    """The replaced ``get_grad_norm_direct`` equals DeepSpeed's own (``ds_class``'s) and an fp64 reference."""
    new = float(opt.get_grad_norm_direct(grads, params))
    old = float(ds_class.get_grad_norm_direct(opt, grads, params))
    ref = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert new > 0 and new == pytest.approx(old, rel=1e-5) and new == pytest.approx(ref, rel=1e-5)


@pytest.mark.compat
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds a CPU engine in-process")
def test_foreach_checks_agree_with_deepspeed_loops():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    engine = _cpu_zero2_engine()
    opt = engine.ds.optimizer
    assert engine.foreach_checks and type(opt) is DeepSpeedZeroOptimizer
    grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
    assert len(grads) > 10 and all(g is not None for g in grads)

    _assert_norm_agrees(opt, DeepSpeedZeroOptimizer, grads, params)

    assert not bool(opt.has_overflow_partitioned_grads_serial())
    assert not bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt))
    for bad in (float("inf"), float("-inf"), float("nan")):
        saved = grads[3].view(-1)[5].clone()
        grads[3].view(-1)[5] = bad
        assert bool(opt.has_overflow_partitioned_grads_serial()), bad
        assert bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt)), bad
        # the invalid-norm sentinel is DeepSpeed's (-1), so clipping/skipping act as before
        assert float(opt.get_grad_norm_direct(grads, params)) == -1.0
        assert float(DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)) == -1.0
        grads[3].view(-1)[5] = saved
    every = [g for i in sorted(opt.averaged_gradients) for g in opt.averaged_gradients[i] or []]
    ref_all = math.sqrt(sum(float(g.double().pow(2).sum()) for g in every))  # both parameter groups
    engine.step()
    res = engine.last_step()
    assert res.applied
    # the norm stays on the device until it is read (no host synchronisation in last_step)
    assert torch.is_tensor(res.grad_norm_value)
    assert res.grad_norm == pytest.approx(ref_all, rel=1e-3)  # bf16, world size 1, loss scale 1


@pytest.mark.compat
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds a CPU engine in-process")
def test_unverified_deepspeed_keeps_its_own_loops(capsys, unverified):
    """The version gate: outside the verified DeepSpeed range nothing of ZeRO's is replaced and one line says so."""
    from deepspeed.runtime.zero import stage_1_and_2 as z12

    unverified("deepspeed", "0.20.0")
    invalid_before = z12.is_invalid_grad_norm
    engine = _cpu_zero2_engine()
    out = capsys.readouterr().out
    assert "[compat] multi-tensor overflow/norm checks: deepspeed 0.20.0 is outside the verified range " \
           ">=0.19,<0.20; DeepSpeed's per-tensor loops run" in out
    opt = engine.ds.optimizer
    assert not engine.foreach_checks
    assert "get_grad_norm_direct" not in vars(opt) and "has_overflow_partitioned_grads_serial" not in vars(opt)
    assert z12.is_invalid_grad_norm is invalid_before
    engine.step()
    assert engine.last_step().applied and engine.last_step().grad_norm > 0


@pytest.mark.compat
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds a CPU engine in-process")
def test_foreach_norm_agrees_with_deepspeed_zero3():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    engine = _cpu_zero2_engine("zero3_fp16")  # bf16 on CPU (DeepSpeed's CPU accelerator has no fp16)
    opt = engine.ds.optimizer
    assert engine.zero_stage == 3 and engine.foreach_checks and type(opt) is DeepSpeedZeroOptimizer_Stage3
    # ZeRO-3 checks overflow on its flat gradient buffer already: only the norm is replaced
    assert "has_overflow_partitioned_grads_serial" not in vars(opt) and "get_grad_norm_direct" in vars(opt)
    grads, params = opt.averaged_gradients[0], opt.fp16_groups[0]
    assert len(grads) > 10 and all(g is not None for g in grads)
    _assert_norm_agrees(opt, DeepSpeedZeroOptimizer_Stage3, grads, params)
    saved = grads[2].view(-1)[1].clone()
    for bad in (float("inf"), float("nan")):
        grads[2].view(-1)[1] = bad
        assert float(opt.get_grad_norm_direct(grads, params)) == -1.0
        assert float(DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct(opt, grads, params)) == -1.0
    grads[2].view(-1)[1] = saved
    every = [g for i in sorted(opt.averaged_gradients) for g in opt.averaged_gradients[i]]  # both groups
    ref_all = math.sqrt(sum(float(g.double().pow(2).sum()) for g in every))
    # the fp16 marker (ZeRO-3 checks overflow whenever its dtype is fp16): not for bf16, set after a passed check
    from pipeline.compat.zero_checks import _KNOWN_VALID

    assert not getattr(opt.get_grad_norm_direct(grads, params), _KNOWN_VALID, False)
    opt.dtype = torch.float16
    try:
        opt.overflow = True
        assert not getattr(opt.get_grad_norm_direct(grads, params), _KNOWN_VALID, False)
        opt.overflow = False
        assert getattr(opt.get_grad_norm_direct(grads, params), _KNOWN_VALID, False)
    finally:
        opt.dtype, opt.overflow = torch.bfloat16, False
    engine.step()
    res = engine.last_step()
    assert res.applied and res.grad_norm == pytest.approx(ref_all, rel=1e-3)


@pytest.mark.compat
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds a CPU engine in-process")
def test_norm_validity_is_known_only_after_a_passed_overflow_check():
    import deepspeed.runtime.zero.stage_1_and_2 as z12

    from pipeline.compat.zero_checks import _KNOWN_VALID

    engine = _cpu_zero2_engine()
    opt = engine.ds.optimizer
    grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
    assert opt.check_grad_overflow and not opt.overflow and opt.dtype == torch.bfloat16
    # bf16: finite gradients can still overflow an fp32 sum of squares, so its norms keep DeepSpeed's check
    assert not getattr(opt.get_grad_norm_direct(grads, params), _KNOWN_VALID, False)
    opt.dtype = torch.float16  # as fp16 (which CPU DeepSpeed cannot run) after a passed check
    try:
        opt.overflow = True
        assert not getattr(opt.get_grad_norm_direct(grads, params), _KNOWN_VALID, False)
        opt.overflow = False
        norm = opt.get_grad_norm_direct(grads, params)
        assert getattr(norm, _KNOWN_VALID, False) and float(norm) > 0
        combined = z12.combine_grad_norm_groups([norm, opt.get_grad_norm_direct(grads, params)])
        assert getattr(combined, _KNOWN_VALID, False) and not z12.is_invalid_grad_norm(combined)
        mixed = z12.combine_grad_norm_groups([norm, torch.tensor(1.0)])
        assert not getattr(mixed, _KNOWN_VALID, False) and not z12.is_invalid_grad_norm(mixed)
        # unmarked tensors still get DeepSpeed's check
        assert z12.is_invalid_grad_norm(torch.tensor(-1.0)) and z12.is_invalid_grad_norm(torch.tensor(float("inf")))
        assert z12.is_invalid_grad_norm(z12.combine_grad_norm_groups([norm, torch.tensor(float("nan"))]))
    finally:
        opt.dtype, opt.overflow = torch.bfloat16, False
    # installing the wrappers again (a second engine in the process) wraps nothing twice
    from pipeline.compat.zero_checks import _install_known_valid_norms

    before = (z12.is_invalid_grad_norm, z12.combine_grad_norm_groups)
    _install_known_valid_norms()
    assert (z12.is_invalid_grad_norm, z12.combine_grad_norm_groups) == before


@pytest.mark.compat
def test_foreach_checks_leave_other_optimizers_alone():
    from pipeline.compat.zero_checks import use_foreach_grad_checks

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert use_foreach_grad_checks(opt) is False
    assert not hasattr(opt, "has_overflow_partitioned_grads_serial")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_eager_loss(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 8, 50, generator=g) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 50, (2, 8), generator=g)
    a = token_cross_entropy(logits, y)
    (ga,) = torch.autograd.grad(a, logits)
    b = compiled_token_cross_entropy(logits, y)
    (gb,) = torch.autograd.grad(b, logits)
    assert a.dtype == b.dtype == torch.float32 and gb.dtype == dtype
    assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-6)
    assert torch.allclose(ga.float(), gb.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert float(a.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(logits.detach().float().view(-1, 50),
                                                                            y.view(-1))), rel=1e-6)


def test_compile_policy():
    assert compile_policy("auto", "cuda", 2)[0] and compile_policy("auto", "cuda", 1)[0]
    assert compile_policy("auto", "cuda", 0)[0]
    on3, why = compile_policy("auto", "cuda", 3)
    assert not on3 and "ZeRO-3" in why
    assert not compile_policy("auto", "cpu", 2)[0]
    assert compile_policy("on", "cpu", 3)[0] and not compile_policy("off", "cuda", 2)[0]
    on3, why = compile_policy("auto", "cuda", 3, deepcompile=True)  # ZeRO-3 compiles through DeepCompile
    assert on3 and "DeepCompile" in why
    assert not compile_policy("auto", "cpu", 3, deepcompile=True)[0]  # DeepCompile needs CUDA


@pytest.mark.compat
def test_unverified_torch_keeps_the_compiled_forward(capsys, unverified):
    """The version gate of eager_forward: outside the verified PyTorch range the compiled forward stays."""
    from pipeline.compat.torch_compat import eager_forward

    unverified("torch", "2.10.0")
    module = torch.nn.Linear(2, 2)
    marker = object()
    module._compiled_call_impl = marker
    with eager_forward(module):
        assert module._compiled_call_impl is marker
    assert "[compat] eager forward of a compiled model: torch 2.10.0 is outside the verified range >=2.11,<2.14; " \
           "the compiled forward runs" in capsys.readouterr().out


@pytest.mark.compat
def test_uncompiled_restores_the_compiled_forward():
    from pipeline.engine import Engine

    class Fake:
        module = torch.nn.Linear(2, 2)

    e = Engine.__new__(Engine)
    e.module = Fake.module
    marker = object()
    e.module._compiled_call_impl = marker
    with e.uncompiled():
        assert e.module._compiled_call_impl is None
        assert e.module(torch.zeros(1, 2)).shape == (1, 2)  # the eager forward runs
    assert e.module._compiled_call_impl is marker


@pytest.mark.slow
@pytest.mark.dist
def test_bench_pretrain_cpu_smoke(tmp_path):
    """The benchmark runs end to end (CPU smoke mode): a baseline measured twice, engine rows with options
    (ZeRO-3 leaf modules in bf16, the per-step norm read), ratios against the baselines' mean, a profile."""
    configs = ["baseline", "zero2_bf16+profile+syncnorm", "zero3_fp16+bf16+leaf", "baseline"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_pretrain.py"), "--device", "cpu", "--preset", "tiny",
           "--vocab", "256", "--seq_len", "32", "--gpus", "1", "--steps", "2", "--windows", "2", "--warmup", "1",
           "--configs", ",".join(configs), "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = tmp_path.glob("pretrain-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["config"] for r in rows] == configs  # a repeated spec is a job of its own
    base1, eng, z3, base2 = rows
    mean = (base1["tokens_per_s_per_gpu"] + base2["tokens_per_s_per_gpu"]) / 2
    assert eng["baseline_runs"] == [base1["tokens_per_s_per_gpu"], base2["tokens_per_s_per_gpu"]]
    assert eng["ratio_to_baseline"] == pytest.approx(eng["tokens_per_s_per_gpu"] / mean)
    assert eng["foreach_checks"] is True and eng["compiled"] is False  # auto: off the GPU
    assert z3["precision"] == "bf16" and z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["leaf_module"]["classes"][0].endswith("LlamaDecoderLayer")
    assert all(r["tokens_per_s_per_gpu"] > 0 and math.isfinite(r["final_loss"]) for r in rows)
    assert "aten::" in next(tmp_path.glob("profiles-*.txt")).read_text()
    assert eng["deferred_overflow"] is False and eng["skipped_steps"] == 0  # bf16: nothing to defer
    (summary,) = json.loads(path.read_text())["summary"]  # only the baseline was measured twice
    assert summary["config"] == "baseline" and summary["n"] == 2 and summary["median_ratio_to_baseline"] == 1.0


def test_bench_summary_takes_medians_over_rounds():
    """--repeat rounds: each configuration's median, its range, and the ratio of medians; rows that differ only
    by a measurement-only option (+syncs) are the same configuration."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_pretrain import summarize

    def row(config, tps, gpus=1):
        return dict(config=config, gpus=gpus, preset="124m", micro_batch=16, tokens_per_s_per_gpu=tps)

    rows = [row("baseline", 100.0), row("zero2_fp16+syncs", 90.0), row("baseline", 130.0), row("zero2_fp16", 120.0),
            row("baseline", 110.0), row("zero2_fp16", 115.0), row("zero1_fp16", 99.0), row("baseline", 50.0, gpus=2),
            dict(config="zero2_fp16", gpus=1, failed=True)]
    by = {s["config"]: s for s in summarize(rows)}
    assert set(by) == {"baseline", "zero2_fp16"}  # measured once: no summary line
    z2 = by["zero2_fp16"]
    assert (z2["n"], z2["median_tokens_per_s"], z2["min_tokens_per_s"], z2["max_tokens_per_s"]) == (3, 115.0, 90.0,
                                                                                                    120.0)
    assert z2["median_ratio_to_baseline"] == pytest.approx(115.0 / 110.0)


@pytest.mark.integration
def test_bench_pretrain_refuses_unknown_configuration():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pretrain.py"), "--configs", "zero9_fp16"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "unknown configuration 'zero9_fp16'" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pretrain.py"), "--configs",
                        "zero2_fp16+fast"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "unknown option '+fast'" in r.stderr


def test_watchdog_prints_stacks_of_a_block_that_hangs(tmp_path):
    """A block outliving the watchdog gets every thread's stack printed (naming the function it hangs in);
    a block that ends in time prints nothing."""
    import time

    from pipeline.train import arm_watchdog, disarm_watchdog

    def stuck_in_collective():
        time.sleep(1.5)

    out = tmp_path / "stacks.txt"
    with open(out, "w") as f:
        arm_watchdog(0.5, file=f)
        try:
            stuck_in_collective()
        finally:
            disarm_watchdog()
    text = out.read_text()
    assert "stuck_in_collective" in text and "Thread" in text
    quiet = tmp_path / "quiet.txt"
    with open(quiet, "w") as f:
        arm_watchdog(5.0, file=f)
        disarm_watchdog()
    time.sleep(0.1)
    assert quiet.read_text() == ""
    arm_watchdog(0)  # off: nothing armed


def test_bench_sync_sites_count_each_synchronisation_by_line(monkeypatch):
    """``+syncs`` attribution, on any machine: PyTorch's sync debug mode warns "called a synchronizing CUDA
    operation" at each implicit synchronisation (emulated here off CUDA), and explicit ``synchronize`` calls are
    counted by wrapping them; each is counted per step under its call site."""
    import importlib.util
    import warnings

    spec = importlib.util.spec_from_file_location("bench_pretrain", ROOT / "scripts" / "bench_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_pretrain", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    class FakeStream:
        def synchronize(self):  # as PyTorch's: the stream synchronisation inside warns in sync debug mode
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    class FakeEvent:
        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)

    def step(_):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # as sync debug mode, for .item()
        warnings.warn("an unrelated warning", stacklevel=1)  # shown as usual, not counted
        torch.cuda.synchronize()
        torch.cuda.Stream().synchronize()  # counted once, not also for the warning it raises
        torch.cuda.Event().synchronize()
        return 0

    with pytest.warns(UserWarning, match="unrelated"):
        out = bench._sync_sites(step, [None], n_steps=2)
    assert modes == ["warn", "default"]  # the mode is restored
    assert out["per_step"] == 4
    sites = {s: c for c, s in out["sites"]}
    assert len(sites) == 4 and all(c == 1 for c in sites.values()), sites
    assert all("test_engine_speed.py" in s and " step" in s for s in sites)
    for label in ("torch.cuda.synchronize", "FakeStream.synchronize", "FakeEvent.synchronize"):
        assert sum(s.startswith(f"[{label}]") for s in sites) == 1, label
    assert torch.cuda.Stream.synchronize is FakeStream.synchronize  # unwrapped again
    assert torch.cuda.Event.synchronize is FakeEvent.synchronize
