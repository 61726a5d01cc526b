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
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _load():
    spec = importlib.util.spec_from_file_location("bench_sparse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
