"""The deferred fp16 overflow check (pipeline.compat.fp16_step) makes DeepSpeed's decisions, step by step.

DeepSpeed's CPU accelerator refuses fp16, so these tests let it claim fp16 support and run real ZeRO-1/2 fp16
engines on a tiny LLaMA in this process: one with DeepSpeed's own step, one with the deferred step, fed the same
batches, with overflows forced by an infinite loss.  (On CUDA the same code runs for real; results/bench/NOTES.md.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.train import token_cross_entropy

# compat: differential tests of pipeline.compat.fp16_step against DeepSpeed's own step
pytestmark = [pytest.mark.compat,
              pytest.mark.skipif(torch.cuda.is_available(), reason="builds CPU engines in-process")]

LR, EPS = 1e-2, 1e-3  # a large epsilon makes the update depend on the gradients' scale (unscaling is checked)


@pytest.fixture
def cpu_fp16(monkeypatch):
    """DeepSpeed's CPU accelerator, claiming fp16 support for this test."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


def _engine(template: str, defer: bool, grad_accum: int = 1, fp16: dict | None = None, precision: str = "fp16"):
    from conftest import ROOT

    from pipeline.ds_config import load_template, resolve_ds_config
    from pipeline.engine import build_engine, init_distributed
    from pipeline.model import ModelConfig, build_model

    launcher = init_distributed()
    model = build_model(ModelConfig(arch="llama", n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=192), 128, 32,
                        seed=0)
    tpl, _ = load_template(ROOT / "ds_configs" / f"{template}.json")
    tpl["fp16"].update(fp16 or {})
    cfg = resolve_ds_config(tpl, micro_batch_size=2, grad_accum=grad_accum, world_size=torch.distributed.get_world_size(),
                            lr=LR, weight_decay=0.1, betas=(0.9, 0.95), eps=EPS, grad_clip=1.0, precision=precision)
    return build_engine(model, cfg, precision, lambda s: min(1.0, (s + 1) / 4),  # warmup: a held step shows
                        dict(lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.1), launcher, defer_overflow=defer)


def _micro_step(engine, batch: torch.Tensor, overflow: bool) -> float:
    loss = token_cross_entropy(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:])
    if overflow:
        loss = loss * float("inf")  # every gradient inf/NaN: the step must be skipped
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def _master(engine) -> torch.Tensor:
    return torch.cat([p.detach().clone() for p in engine.ds.optimizer.single_partition_of_fp32_groups])


@pytest.mark.parametrize("template,grad_accum", [("zero2_fp16", 1), ("zero2_fp16", 2), ("zero1_fp16", 1)])
def test_deferred_step_makes_deepspeeds_decisions(cpu_fp16, template, grad_accum):
    ref, new = _engine(template, defer=False, grad_accum=grad_accum), _engine(template, defer=True,
                                                                              grad_accum=grad_accum)
    assert ref.deferred is None and new.deferred is not None
    start = _master(ref)
    assert torch.equal(start, _master(new))
    overflow_steps = {2, 3, 5}  # two in a row: hysteresis 2 halves the scale on the second
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(8):
        batches = [torch.randint(0, 128, (2, 33), generator=g) for _ in range(grad_accum)]
        bad = step in overflow_steps
        losses = {}
        for name, engine in (("ref", ref), ("new", new)):
            for k, b in enumerate(batches):
                losses[name] = _micro_step(engine, b, bad and k == grad_accum - 1)
        r_ref, r_new = ref.last_step(), new.last_step()
        # the deferred step has not read its flag yet: nothing waited for the GPU
        assert not r_new.known and new.deferred.pending is not None
        assert (r_new.applied, r_new.loss_scale) == (r_ref.applied, r_ref.loss_scale) == (not bad, r_ref.loss_scale)
        assert new.skipped_steps == ref.skipped_steps and new.ds.global_steps == ref.ds.global_steps
        assert new.lr() == ref.lr()  # the held LR-schedule step was made only for applied steps
        if bad:
            assert math.isinf(r_new.grad_norm) and math.isinf(r_ref.grad_norm)
        else:
            assert losses["new"] == pytest.approx(losses["ref"], rel=1e-3)
            assert r_new.grad_norm == pytest.approx(r_ref.grad_norm, rel=1e-3)
        if step == 0:  # same state, same gradients: the same update to float rounding
            assert (_master(new) - _master(ref)).abs().max() < 1e-6
        seen.append((r_ref.applied, r_ref.loss_scale))
    assert seen[2] == (False, 2.0**16) and seen[3] == (False, 2.0**15) and seen[5][1] == 2.0**14
    assert ref.skipped_steps == 3
    # later steps differ by fp16 rounding only (a weight that rounds the other way): small against the movement
    moved = (_master(ref) - start).abs().max()
    assert (_master(new) - _master(ref)).abs().max() < 0.05 * moved
    # what a checkpoint holds: loss scaler, optimizer step counts, LR schedule
    o_ref, o_new = ref.ds.optimizer, new.ds.optimizer
    assert vars(o_new.loss_scaler) == vars(o_ref.loss_scaler)
    steps_ref = [float(s["step"]) for s in o_ref.optimizer.state.values()]
    assert steps_ref == [5.0, 5.0] and [float(s["step"]) for s in o_new.optimizer.state.values()] == steps_ref
    assert new.ds.lr_scheduler.state_dict() == ref.ds.lr_scheduler.state_dict()


def test_the_outcome_is_known_after_the_next_backward(cpu_fp16):
    engine = _engine("zero2_fp16", defer=True)
    batch = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    _micro_step(engine, batch, overflow=True)
    first = engine.last_step()
    assert not first.known
    loss = token_cross_entropy(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:])
    engine.backward(loss)  # reads the flag before scaling this loss
    assert first.known and not first.applied and engine.deferred.pending is None
    assert engine.deferred.host_reads == 1 and engine.deferred.waits == 0  # off CUDA the copy is synchronous
    engine.step()
    second = engine.last_step()
    assert second is not first and second.applied  # read on demand: the property settles it
    assert engine.skipped_steps == 1


def test_overflow_at_the_minimum_loss_scale_stops_at_the_next_read(cpu_fp16):
    from pipeline.engine import FP16HealthError

    engine = _engine("zero2_fp16", defer=True, fp16=dict(initial_scale_power=0, min_loss_scale=1, hysteresis=1))
    batch = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    _micro_step(engine, batch, overflow=True)  # launched: the host does not know yet
    with pytest.raises(FP16HealthError, match="minimum"):
        engine.last_step().applied  # noqa: B018 - reading it reads the flag (the training loop's health check)
    _micro_step(engine, batch, overflow=True)
    with pytest.raises(FP16HealthError, match="minimum"):
        engine.settle()


def test_deferred_step_only_where_it_applies(cpu_fp16):
    from pipeline.compat.fp16_step import why_not

    bf16 = _engine("zero2_bf16", defer=True, precision="bf16")
    assert bf16.deferred is None and "fp16" in why_not(bf16.ds)
    off = _engine("zero2_fp16", defer=False)
    assert off.deferred is None and why_not(off.ds) is None
    z3 = _engine("zero3_fp16", defer=True)
    assert z3.deferred is None and "DeepSpeedZeroOptimizer" in why_not(z3.ds)


@pytest.mark.dist
def test_two_ranks_skip_together_and_keep_partitions_in_step(tmp_path):
    """Two CPU ranks under the deepspeed launcher (ZeRO-2 partitions the fp32 master weights and the optimizer
    state): an overflow on one rank only skips the step on both, and every rank's partition moves as under
    DeepSpeed's own step."""
    import json
    import os
    import subprocess
    import textwrap

    from conftest import BIN, DIST_VARS, ROOT, free_port

    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(
        """
        import json, os, sys
        import torch
        sys.path.insert(0, "tests")
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True
        from test_fp16_step import _engine, _master, _micro_step
        ref, new = _engine("zero2_fp16", defer=False), _engine("zero2_fp16", defer=True)
        rank = torch.distributed.get_rank()
        start = _master(ref)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        rows = []
        for step in range(6):
            batch = torch.randint(0, 128, (2, 33), generator=g)
            for engine in (ref, new):
                _micro_step(engine, batch, overflow=(step == 2 and rank == 1))
            a, b = ref.last_step(), new.last_step()
            rows.append([a.applied, b.applied, a.loss_scale, b.loss_scale, ref.lr(), new.lr()])
        json.dump(dict(rows=rows, diff=float((_master(new) - _master(ref)).abs().max()),
                       moved=float((_master(ref) - start).abs().max()), numel=start.numel(),
                       total=sum(p.numel() for p in ref.module.parameters())), open(f"{sys.argv[1]}.{rank}", "w"))
        from pipeline import dist
        dist.shutdown()
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown (see test_accelerate_launch_with_yaml_and_resolved_plugin)
        """))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    p = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port",
                        str(free_port()), str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads(Path(f"{out}.{rank}").read_text())
        assert r["numel"] < r["total"]  # a partition, not the whole model
        applied = [(row[0], row[1]) for row in r["rows"]]
        assert applied == [(True, True), (True, True), (False, False), (True, True), (True, True), (True, True)]
        assert all(row[2] == row[3] and row[4] == row[5] for row in r["rows"])
        assert r["diff"] < 0.05 * r["moved"]


def test_a_checkpoint_taken_between_deferred_steps_resumes_the_same_run(cpu_fp16, tmp_path):
    """Saving settles the pending step (loss scaler, skip count, LR schedule and optimizer step count in the
    checkpoint); a resumed engine re-reads the step count and continues exactly as the uninterrupted one."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 128, (2, 33), generator=g) for _ in range(7)]
    whole = _engine("zero2_fp16", defer=True)
    for i, b in enumerate(batches[:3]):
        _micro_step(whole, b, overflow=i == 1)
    assert not whole.last_step().known
    whole.save_checkpoint(tmp_path, "step3", {})
    assert whole.last_step().known and whole.skipped_steps == 1
    lr_at_save = whole.lr()
    for b in batches[3:]:
        _micro_step(whole, b, overflow=False)
    resumed = _engine("zero2_fp16", defer=True)
    resumed.load_checkpoint(tmp_path, "step3")
    assert resumed.skipped_steps == 1 and resumed.lr() == lr_at_save == LR * 3 / 4  # warmup after 2 applied steps
    for b in batches[3:]:
        _micro_step(resumed, b, overflow=False)
    assert torch.allclose(_master(resumed), _master(whole), rtol=0, atol=1e-6)
    assert (resumed.lr(), resumed.loss_scale(), resumed.skipped_steps) == (whole.lr(), whole.loss_scale(), 1)
    steps = [float(s["step"]) for s in resumed.ds.optimizer.optimizer.state.values()]
    assert steps == [float(s["step"]) for s in whole.ds.optimizer.optimizer.state.values()] == [6.0, 6.0]


def test_unverified_deepspeed_runs_its_own_step(cpu_fp16, monkeypatch, capsys, unverified):
    """The version gate: outside the verified DeepSpeed range the deferred step is not installed, DeepSpeed's own
    ZeRO-1/2 step runs (and takes the same decisions), and one line says so."""
    unverified("deepspeed", "0.18.5")
    engine = _engine("zero2_fp16", defer=True)
    out = capsys.readouterr().out
    assert engine.deferred is None
    assert "[compat] deferred fp16 overflow step: deepspeed 0.18.5 is outside the verified range >=0.19,<0.20; " \
           "DeepSpeed's own ZeRO-1/2 fp16 step runs" in out
    assert out.count("[compat] deferred fp16 overflow step") == 1
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert engine.ds.optimizer.step.__func__ is DeepSpeedZeroOptimizer.step
    batch = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    _micro_step(engine, batch, overflow=True)  # DeepSpeed's own step skips it (its step reads the flag itself)
    assert engine.ds.skipped_steps == 1 and engine.last_step().applied is False
    _micro_step(engine, batch, overflow=False)
    assert engine.ds.skipped_steps == 1 and engine.last_step().applied is True
