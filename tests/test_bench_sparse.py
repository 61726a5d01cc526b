"""scripts/bench_sparse.py on CPU: the tiny preset end to end (dense and structured, prefill and decode), the
argument checks, and the speed-up / goal bookkeeping that the CUDA rows (2:4, graphs) go through."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_sparse.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _load():
    spec = importlib.util.spec_from_file_location("bench_sparse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.integration
def test_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench"
    proc = _run("--presets", "tiny", "--batch_sizes", "1,2", "--seq_lens", "32", "--decode_context", "16",
                "--decode_batch_sizes", "1", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--out", str(out),
                "--variants", "dense,structured,2:4", "--goal_shape", "2x32", "--dynamic_decode", "--no-static_decode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2:4 is measured on CUDA only" in proc.stdout
    files = list(out.glob("sparse-*.json"))
    assert len(files) == 1 and str(files[0]) in proc.stdout
    res = json.loads(files[0].read_text())
    assert res["complete"] is True and res["device"] == "cpu" and res["dtype"] == "fp32"
    assert res["versions"]["torch"] and res["versions"]["transformers"]
    assert res["variants_measured"] == ["dense", "structured"]

    params = {v["variant"]: v["n_params"] for v in res["variants"]}
    assert set(params) == {"dense", "structured"}
    assert 0 < params["structured"] < params["dense"]
    s = next(v for v in res["variants"] if v["variant"] == "structured")
    assert s["heads"] == 2 and s["intermediate_size"] == 96  # half of tiny's 4 heads and 192 MLP channels

    rows = res["rows"]
    assert not [r for r in rows if "error" in r]
    for variant in ("dense", "structured"):
        pre = [r for r in rows if r["variant"] == variant and r["phase"] == "prefill"]
        dec = [r for r in rows if r["variant"] == variant and r["phase"] == "decode"]
        assert {(r["batch"], r["seq_len"]) for r in pre} == {(1, 32), (2, 32)}
        assert [(r["batch"], r["context"]) for r in dec] == [(1, 16)]
        assert all(r["mode"] == "eager" for r in pre + dec)  # no CUDA graphs on CPU
    for r in rows:
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["latency_min_ms"] <= r["latency_ms"] <= r["latency_max_ms"]
        if r["variant"] == "dense":
            assert r["speedup"] == 1.0
    dec = next(r for r in rows if r["variant"] == "dense" and r["phase"] == "decode")
    assert dec["tokens_per_s"] == pytest.approx(1 / (dec["latency_ms"] / 1e3))  # batch 1, one token per step
    assert res["goals"]["structured_prefill"]["met"] in (True, False)
    assert res["goals"]["sparse_24"]["met"] is None and "CUDA" in res["goals"]["sparse_24"]["note"]
    assert "goal, structured 50% prefill" in proc.stdout


@pytest.mark.integration
def test_bad_preset_stops_before_any_work(tmp_path):
    out = tmp_path / "bench"
    r = _run("--presets", "tiny,nosuch", "--device", "cpu", "--out", str(out))
    assert r.returncode == 2
    assert "nosuch" in r.stderr and "tiny" in r.stderr  # names the unknown one and the choices
    assert not out.exists()


def test_every_bad_argument_is_reported_at_once(capsys):
    bs = _load()
    with pytest.raises(SystemExit) as e:
        bs.parse_args(["--presets", "tiny", "--batch_sizes", "0,2", "--device", "cpu"])
    assert e.value.code == 2 and "--batch_sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bs.parse_args(["--presets", "tiny", "--repeats", "0", "--variants", "structured", "--sparsity", "0.3",
                       "--dtype", "fp16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "--repeats" in err and "must include dense" in err and "head_ratio" in err and "fp16 on CPU" in err


def test_speedups_wins_and_goals():
    bs = _load()

    def row(variant, phase, mode, ms, batch=8, seq=1024, ctx=0):
        return {"preset": "124m", "variant": variant, "phase": phase, "mode": mode, "batch": batch,
                "seq_len": seq, "context": ctx, "latency_ms": ms, "tokens_per_s": batch * seq / ms * 1e3}

    rows = [row("dense", "prefill", "eager", 10.0), row("structured", "prefill", "eager", 6.0),
            row("2:4", "prefill", "eager", 20.0),
            row("dense", "prefill", "graph", 8.0), row("structured", "prefill", "graph", 4.0),
            row("2:4", "prefill", "graph", 6.0),
            row("dense", "decode", "graph", 2.0, 16, 1, 512), row("2:4", "decode", "graph", 1.9, 16, 1, 512),
            {**row("2:4", "decode", "eager", 1.0, 16, 1, 512), "error": "RuntimeError: refused"}]
    del rows[-1]["latency_ms"]
    bs.add_speedups(rows)
    assert rows[1]["speedup"] == pytest.approx(10 / 6) and rows[4]["speedup"] == pytest.approx(2.0)
    assert rows[2]["wins"] is False and rows[5]["wins"] is True and rows[7]["wins"] is True
    g = bs.goals(rows, "cuda", ["dense", "structured", "2:4"])
    st = g["structured_prefill"]
    assert st["met"] is True and st["per_shape"][0]["mode"] == "graph"  # best mode per shape
    s24 = g["sparse_24"]
    assert s24["met"] is False  # decode wins by only 2000/1900
    assert [x["shape"] for x in s24["loses"]] == ["124m prefill eager b8 t1024"]
    assert [x["shape"] for x in s24["failed"]] == ["124m decode eager b16 ctx512"]
    assert s24["min_winning_speedup"] == pytest.approx(2.0 / 1.9)


@pytest.mark.integration
def test_static_decode_profile_and_controls_on_cpu(tmp_path):
    """The issue-18 additions on CPU: the dense+fuse control, static-cache decode rows of every decode variant
    (interleaved, eager on CPU), the profile (op categories, linear labels, text file) and the goals' bookkeeping;
    2:4 variants are left out on CPU."""
    out = tmp_path / "bench"
    proc = _run("--presets", "tiny", "--variants", "dense,structured,dense+fuse,2:4+ft", "--batch_sizes", "1",
                "--seq_lens", "16", "--goal_shape", "2x16", "--decode_batch_sizes", "1,2", "--prompt_len", "6",
                "--gen_tokens", "5", "--profile", "--profile_presets", "tiny", "--quick", "--device", "cpu",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(out.glob("sparse-*.json")).read_text())
    assert res["complete"] and res["variants_measured"] == ["dense", "structured", "dense+fuse"]
    assert res["args"]["repeats"] == 5 and res["args"]["gen_tokens"] == 5  # --quick caps, never raises
    fuse = next(v for v in res["variants"] if v["variant"] == "dense+fuse")
    assert fuse["n_fused"] == 10  # q, k, v, gate, up in each of tiny's 2 layers
    rows = res["rows"]
    assert not [r for r in rows if "error" in r]
    pre = {(r["variant"], r["batch"], r["seq_len"]) for r in rows if r["phase"] == "prefill"}
    assert pre == {(v, b, 16) for v in ("dense", "structured", "dense+fuse") for b in (1, 2)}  # goal shape added
    dec = [r for r in rows if r["phase"] == "decode_static"]
    assert {(r["variant"], r["batch"]) for r in dec} == {(v, b) for v in ("dense", "structured", "dense+fuse")
                                                         for b in (1, 2)}
    for r in dec:
        assert r["mode"] == "eager" and r["context"] == 6 and r["new_tokens"] == 5
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["latency_ms"])
        assert r["speedup"] > 0 and (r["variant"] != "dense" or r["speedup"] == 1.0)
    profs = {p["variant"]: p for p in res["profiles"] if p["phase"] == "prefill"}
    assert set(profs) == {"dense", "structured"}  # the default --profile_variants that were measured
    decs = {p["variant"]: p for p in res["profiles"] if p["phase"] == "decode"}
    assert set(decs) == {"dense", "structured"} and decs["dense"]["steps"] == 4  # 5 tokens: 4 decode steps
    for p in [*profs.values(), *decs.values()]:
        cats = p["eager"]["categories"]
        assert {"dense mm", "attention", "LM head"} <= set(cats)
        assert p["eager"]["ms_per_forward"] == pytest.approx(sum(cats.values()))
        labels = {x["label"]: x for x in p["eager"]["linear"]}
        assert labels["lm_head"]["calls_per_forward"] == 1.0
        assert all(x["calls_per_forward"] == 2.0 for k, x in labels.items() if k.startswith("linear:"))  # 2 layers
    assert "linear:q_proj 32x64" in {x["label"] for x in profs["structured"]["eager"]["linear"]}  # 2 of 4 heads
    text = next(out.glob("profile-*.txt")).read_text()
    assert "kernel sum (eager)" in text and "largest kernels, tiny dense" in text and "ms per decode step" in text
    g = res["goals"]
    assert g["model_24"]["met"] is None and g["structured_decode"]["met"] is None
    assert g["decode_not_slower"]["met"] in (True, False)
    assert "issue 18's goals" in proc.stdout


@pytest.mark.integration
def test_time_budget_skips_and_still_writes(tmp_path):
    out = tmp_path / "bench"
    proc = _run("--presets", "tiny", "--device", "cpu", "--time_budget", "0.000001", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(out.glob("sparse-*.json")).read_text())
    assert res["complete"] and res["rows"] == [] and res["skipped"] == ["preset tiny"]
    assert "time budget" in proc.stdout


def test_op_categories():
    bs = _load()
    c = bs.op_category
    lin = ["aten::mm", "aten::linear", "linear:q_proj 64x64", "LlamaModel"]
    assert c("sm90_xmma_sparse_gemm", ["cudaLaunchKernel", "aten::_cslt_sparse_mm", *lin]) == "sparse mm"
    assert c("nvjet_hsh", ["aten::mm", *lin[1:]]) == "dense mm"
    assert c("direct_copy_kernel", ["aten::copy_", "aten::clone", "aten::contiguous", *lin[2:]]) == "layout copy"
    assert c("direct_copy_kernel", ["aten::copy_", "aten::_to_copy", "aten::to"]) == "dtype conversion"
    assert c("elementwise", ["aten::constant_pad_nd", "aten::pad", "aten::_cslt_sparse_mm"]) == "sparse mm"
    assert c("elementwise", ["aten::constant_pad_nd", "aten::pad", "aten::mm"]) == "padding"
    assert c("gemm", ["aten::mm", "aten::linear", "lm_head"]) == "LM head"
    assert c("flash_fwd", ["aten::_flash_attention_forward", "aten::scaled_dot_product_attention"]) == "attention"
    assert c("reduce_kernel", ["aten::mean", "norm"]) == "norms"
    assert c("vectorized_elementwise_kernel", ["aten::mul"]) == "elementwise/other"
    # graph replays: kernel names only
    assert c("flash_fwd_splitkv_kernel", []) == "attention"
    assert c("flash_fwd_kernel", ["cudaGraphLaunch"]) == "attention"  # runtime calls are not ops
    assert c("sm90_xmma_gemm_f16f16", []) == "dense mm"
    assert c("cusparseLt_sm90_spmma", []) == "sparse mm"
    assert c("direct_copy_kernel_cuda", []) == "other copies"


def test_issue_18_goals():
    bs = _load()

    def row(preset, variant, phase, ms, batch=16, seq=1024):
        return {"preset": preset, "variant": variant, "phase": phase, "mode": "graph", "batch": batch,
                "seq_len": seq if phase == "prefill" else 1, "context": 0 if phase == "prefill" else 128,
                "latency_ms": ms, "tokens_per_s": 1.0}

    rows = [row("1b", "dense", "prefill", 100.0), row("1b", "2:4", "prefill", 120.0),
            row("1b", "2:4+ft", "prefill", 85.0), row("1b", "structured", "prefill", 60.0),
            row("350m", "dense", "prefill", 50.0), row("350m", "2:4+ft", "prefill", 49.0),
            row("350m", "structured", "prefill", 33.0),
            row("1b", "dense", "decode_static", 10.0, 1), row("1b", "structured", "decode_static", 7.0, 1),
            row("1b", "dense", "decode_static", 20.0, 16), row("1b", "structured", "decode_static", 16.0, 16),
            row("1b", "2:4+ft", "decode_static", 30.0, 16)]
    bs.add_speedups(rows)
    g = bs.goals_18(rows, (16, 1024))
    m = g["model_24"]
    assert m["per_preset"]["1b"]["best_variant"] == "2:4+ft" and m["per_preset"]["1b"]["met"] is True
    assert m["per_preset"]["350m"]["met"] is False and m["met"] is False  # 50/49 < 1.05
    assert g["structured_prefill_18"]["per_preset"]["1b"]["met"] and not g["structured_prefill_18"]["met"]
    sd = g["structured_decode"]["per_preset"]["1b"]
    assert sd["per_batch"] == {1: pytest.approx(10 / 7), 16: pytest.approx(1.25)} and sd["met"] is False
    assert g["decode_not_slower"]["met"] is True  # the slower 2:4 decode row is not a dense-kernel student
