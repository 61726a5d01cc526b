"""Inference speed of sparse models against dense on the same shapes: 2:4 semi-structured weights and a
50% structured (width-pruned) model, prefill and decode, with the speed-up, and the shapes where 2:4 loses.

    python scripts/bench_sparse.py [--presets 124m,350m] [--batch_sizes 1,8,32] [--seq_lens 128,1024]
        [--decode_context 512] [--decode_batch_sizes 1,16] [--repeats 20] [--warmup 5]
        [--device cuda|cpu] [--dtype fp16] [--out results/bench]

For each preset (``pipeline/presets.py``: the ``pretrain.model`` shape and the ``data.vocab_size``) one
randomly initialised LLaMA (fixed ``--seed``) is built and measured as three variants:

- ``dense``: the model as built, the baseline of every speed-up;
- ``structured``: stage 03's width pruning (``pipeline.prune.prune_model`` with ``method="structured"``,
  ``--sparsity`` 0.5): half of the attention heads (key/value groups) and of the MLP channels removed in every
  block, a genuinely smaller dense model (``n_params`` of each variant is in the JSON);
- ``2:4`` (CUDA only): stage 03's ``nm`` masks (the 2 largest ``|w|`` of every 4 along the input dimension,
  ``pipeline.sparsity.compute_masks``/``apply_masks``) on the block linears, then
  ``pipeline.evaluate.to_semi_structured`` turns the weights into ``torch.sparse.to_sparse_semi_structured``
  tensors.  ``max_abs_logit_diff`` against the same masked weights run dense checks the conversion.

Measurements, all under ``torch.inference_mode`` with ``pipeline.evaluate.time_ms`` (CUDA events on CUDA,
``time.perf_counter`` on CPU), median of ``--repeats`` calls after ``--warmup`` untimed ones:

- ``prefill``: one forward pass over ``(batch, seq_len)`` random tokens, no KV cache; by default only the
  last position's logits are computed (``logits_to_keep=1``, as ``generate`` does for its prefill;
  ``--prefill_logits all`` computes every position's, as stage 05's ``forward_latency``);
- ``decode``: one decoding step of ``batch`` sequences, each with a KV cache (``DynamicCache``) of
  ``--decode_context`` tokens made by one prefill, fed one new token; the cache is cropped back to
  ``--decode_context`` before every step, outside the timed region, so every step sees the same length;
- modes: ``eager``, and on CUDA ``graph``: the same call captured once in a CUDA graph
  (``pipeline.evaluate.cuda_graph``) and replayed, which removes the per-call host cost (for the decode step
  the graph replays the step at the fixed cache length);
- per linear-layer shape (CUDA only): ``pipeline.evaluate.linear_shape_bench``, dense ``F.linear`` against 2:4
  on every distinct ``(out, in)`` weight shape of the preset's block linears at ``--linear_tokens`` tokens.

Units: latency in milliseconds (``latency_ms``: median; ``latency_min_ms``/``latency_max_ms``), throughput in
tokens/s (prefill: ``batch * seq_len`` / latency; decode: ``batch`` new tokens / step latency), speed-up =
dense latency / variant latency for the same preset, phase, shape and mode (>1: faster than dense).  Every
2:4 row carries ``wins`` (speed-up > 1); the shapes where 2:4 loses are printed, not hidden.  A measurement
that fails (a kernel refusing a shape, out of memory, a capture that fails) records its ``error`` and the run
goes on.

Goals, from issue 7: a 50% structured-pruned model at least 1.6x the dense model's prefill throughput
(checked on every prefill shape, the better of eager and graph per shape); 2:4 at least 1.2x on the shapes
where it wins (every winning 2:4 row, prefill and decode).  Both are printed as met or not met.

What is known about 2:4 beforehand: PyTorch's ``torch.sparse.to_sparse_semi_structured`` documentation and
source (CUDA fp16/bf16/int8 weights whose dimensions are multiples of a minimum tile, 32x64 for fp16 with the
cuSPARSELt backend, dense inputs padded to the kernel's tile), and the H200 observations recorded in
``pipeline/evaluate.py`` (``to_semi_structured``: the transposed sparse output that sent attention to its
slow fp32 kernel, fixed by a contiguous copy that is part of every 2:4 timing; ``linear_shape_bench``: eager
sparse matmuls pay a fixed host cost per call, which CUDA graphs remove), in ``../shared/gpu/NOTES.md``
(the CUTLASS backend refuses Hopper, so cuSPARSELt runs there) and in the README (on the 124M shapes 2:4
lost to dense even inside CUDA graphs).

Output: a table on stdout, the goals, and ``<out>/sparse-<YYYYmmdd-HHMMSS>.json`` (time, device name,
torch/transformers versions, dtype, the arguments, ``variants`` with ``n_params`` each, ``rows``,
``linear_shapes``, ``goals``), rewritten after each preset so an interrupted run keeps what it measured
(``complete`` is false until the end).  ``--device cpu`` (the default without CUDA) measures dense and
structured in fp32, eager only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata as md
import inspect
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.evaluate import cuda_graph, linear_shape_bench, prunable_linears, time_ms, to_semi_structured  # noqa: E402
from pipeline.presets import PRESETS  # noqa: E402

VARIANTS = ("dense", "structured", "2:4")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: issue 7's goals
GOAL_STRUCTURED_PREFILL = 1.6
GOAL_24_WHERE_WINS = 1.2


# ---------------------------------------------------------------------------------------------
# arguments


def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"'{text}': need one or more positive integers")
    return vals


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument; any problem is an argparse error (exit 2) before any work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", type=_names, default=["124m", "350m"],
                    help=f"comma-separated presets from pipeline/presets.py ({', '.join(PRESETS)})")
    ap.add_argument("--variants", type=_names, default=list(VARIANTS),
                    help="comma-separated, from dense,structured,2:4 (dense is required: the baseline)")
    ap.add_argument("--batch_sizes", type=_positive_ints, default=[1, 8, 32], help="prefill batch sizes")
    ap.add_argument("--seq_lens", type=_positive_ints, default=[128, 1024], help="prefill sequence lengths")
    ap.add_argument("--decode_context", type=int, default=512, help="KV-cache length (tokens) of the decode step")
    ap.add_argument("--decode_batch_sizes", type=_positive_ints, default=[1, 16], help="decode batch sizes")
    ap.add_argument("--linear_tokens", type=_positive_ints, default=[16, 2048, 16384],
                    help="token counts of the per-linear-shape table (CUDA)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before each measurement")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="structured: fraction of heads (key/value groups) and MLP channels removed per block")
    ap.add_argument("--structured_backend", choices=("auto", "torch_pruning", "manual"), default="manual",
                    help="structured pruning backend (stage 03's --structured_backend; the shapes, hence the "
                         "speed, are the same with each)")
    ap.add_argument("--prefill_logits", choices=("last", "all"), default="last",
                    help="prefill computes the last position's logits (as generate) or every position's")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, also time CUDA-graph replays")
    ap.add_argument("--decode_graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="with --graphs, also capture decode steps (a capture that fails can leave the CUDA context "
                         "unusable for the rows after it: --no-decode_graphs keeps to eager decode)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the masks and the token ids")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="output folder")
    args = ap.parse_args(argv)

    problems = []
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        problems.append(f"--presets: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if not args.presets:
        problems.append("--presets: give at least one preset")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        problems.append(f"--variants: unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if "dense" not in args.variants:
        problems.append("--variants: must include dense (the baseline of every speed-up)")
    for k in ("decode_context", "repeats"):
        if getattr(args, k) < 1:
            problems.append(f"--{k} must be positive, got {getattr(args, k)}")
    if args.warmup < 0:
        problems.append(f"--warmup must be 0 or more, got {args.warmup}")
    if not 0.0 < args.sparsity < 1.0:
        problems.append(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.device == "cpu" and args.dtype == "fp16":
        problems.append("--dtype fp16 on CPU is slow and not representative; use fp32 (or bf16) on CPU")
    if not unknown and "structured" in args.variants and 0.0 < args.sparsity < 1.0:
        problems += _structured_problems(args)
    if problems:
        ap.error("\n  " + "\n  ".join(problems))
    return args


def _model_config(preset: str, args: argparse.Namespace):
    """(ModelConfig, vocab_size, seq_len) of a preset; ``max_position`` covers every measured length
    (RoPE has no learned positions, so this changes no weight shape)."""
    from pipeline.model import ModelConfig

    p = PRESETS[preset]
    seq = int(p["data"]["seq_len"])
    longest = max(seq, max(args.seq_lens), args.decode_context + 1)
    mcfg = ModelConfig(**{**p["pretrain"]["model"], "max_position": longest})
    return mcfg, int(p["data"]["vocab_size"]), seq


def _structured_problems(args: argparse.Namespace) -> list[str]:
    """Width-pruning problems of each preset at ``--sparsity`` (e.g. a ratio that splits heads)."""
    from pipeline.model import hf_config
    from pipeline.prune import width_plan

    out = []
    for preset in args.presets:
        mcfg, vocab, seq = _model_config(preset, args)
        if mcfg.arch != "llama":
            out.append(f"--presets {preset}: structured pruning needs a LLaMA model, this preset is {mcfg.arch}; "
                       f"leave structured out of --variants")
            continue
        _, problems = width_plan(hf_config(mcfg, vocab, seq), args.sparsity, args.sparsity)
        out += [f"--presets {preset}, --sparsity {args.sparsity:g}: {p}" for p in problems]
    return out


# ---------------------------------------------------------------------------------------------
# building the variants


def build_dense(preset: str, args: argparse.Namespace):
    """The preset's LLaMA, random init from ``--seed``, fp32 on CPU, eval mode."""
    from pipeline.model import build_model

    mcfg, vocab, seq = _model_config(preset, args)
    return build_model(mcfg, vocab, seq, seed=args.seed).eval(), vocab


def _n_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters), tied weights once."""
    from pipeline.model import count_params

    nz = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return count_params(model, exclude_position_embeddings=False), nz


def _shape_info(model) -> dict[str, int]:
    c = model.config
    return {"n_layer": c.num_hidden_layers, "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size}


def make_variant(name: str, base, args: argparse.Namespace, vocab: int) -> tuple[Any, dict[str, Any]]:
    """A copy of ``base`` turned into variant ``name``, on ``--device`` in ``--dtype``, eval mode; and its
    description (``n_params``, ``nonzero_params``, shape; structured: the plan; 2:4: ``n_converted`` layers,
    ``skipped`` ones with the reason, and ``max_abs_logit_diff``).

    Pruning runs on the CPU copy in fp32 (as the GPU runs' stage-03 stand-in did), so the device sees only
    the finished model.  Structured pruning uses ``--structured_backend`` (default ``manual``: the same plan
    and resulting shapes as stage 03's ``auto``, without tracing torch-pruning's dependency graph,
    which is known to hang on some model/library combinations; speed depends only on the shapes)."""
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = copy.deepcopy(base)
    info: dict[str, Any] = {}
    if name == "structured":
        from pipeline.prune import PruneConfig, prune_model

        cfg = PruneConfig(method="structured", sparsity=args.sparsity, structured_backend=args.structured_backend,
                          device="cpu", seed=args.seed)
        info["plan"] = prune_model(model, cfg)["plan"]
    elif name == "2:4":
        from pipeline.sparsity import apply_masks, compute_masks

        apply_masks(model, compute_masks(model, "nm", n=2, m=4))
    model = model.to(device=dev, dtype=dtype).eval()
    info["n_params"], info["nonzero_params"] = _n_params(model)
    info.update(_shape_info(model))
    if name == "2:4":
        ids = torch.randint(0, vocab, (1, min(args.seq_lens)), generator=torch.Generator().manual_seed(args.seed))
        ids = ids.to(dev)
        with torch.inference_mode():
            ref = model(input_ids=ids, use_cache=False).logits.float()
        converted, skipped = to_semi_structured(model)
        info["n_converted"], info["skipped"] = len(converted), skipped  # skipped: layer -> reason
        if not converted:
            raise RuntimeError(f"no layer converted to 2:4 (first refusal: {next(iter(skipped.values()), '?')})")
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False).logits.float()
        info["max_abs_logit_diff"] = float((out - ref).abs().max())
        del ref, out
    return model, info


# ---------------------------------------------------------------------------------------------
# measuring


def _forward_params(model) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def _prefill_kwargs(model, which: str) -> tuple[dict[str, Any], str]:
    """Keyword arguments restricting the logits to the last position (when asked and supported), and what
    was done (``last`` or ``all``)."""
    if which == "last":
        params = _forward_params(model)
        for k in ("logits_to_keep", "num_logits_to_keep"):  # transformers >= 4.50 / 4.45-4.49
            if k in params:
                return {k: 1}, "last"
    return {}, "all"


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument: ``cache`` in newer transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _crop_to(cache, length: int) -> None:
    """Drop the tokens beyond ``length`` (host-side slicing only: safe inside a CUDA-graph capture).
    A negative argument to ``crop`` removes that many tokens in transformers 4.x and 5.x alike."""
    extra = int(cache.get_seq_length()) - length
    if extra > 0:
        cache.crop(-extra)


def _cache_tensors(cache) -> list:
    """References to the cache's current key/value tensors (kept alive while a captured graph reads them)."""
    if hasattr(cache, "layers"):
        return [getattr(layer, a, None) for layer in cache.layers for a in ("keys", "values")]
    return list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _stats(times: list[float], tokens: int) -> dict[str, float]:
    ms = statistics.median(times)
    return {"latency_ms": ms, "latency_min_ms": min(times), "latency_max_ms": max(times),
            "tokens_per_s": tokens / (ms / 1e3)}


def _free(device: str, sync: bool = False) -> None:
    """Collect garbage and return cached CUDA memory; never raises (after a failed kernel or capture the
    CUDA context may be broken: the next measurement then records that error)."""
    gc.collect()
    if device == "cuda":
        try:
            if sync:
                torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            print(f"  (freeing CUDA memory failed: {_error(e)})", flush=True)


@torch.inference_mode()
def measure_prefill(model, vocab: int, args: argparse.Namespace, base: dict[str, Any]) -> list[dict]:
    """Prefill rows (eager, and graph on CUDA) for every (batch, seq_len); ``base`` fills the common fields."""
    dev = args.device
    graphs = dev == "cuda" and args.graphs
    kw, logits = _prefill_kwargs(model, args.prefill_logits)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for b in args.batch_sizes:
        for t in args.seq_lens:
            ids_cpu = torch.randint(0, vocab, (b, t), generator=gen)
            ids = None
            for mode in ("eager", "graph") if graphs else ("eager",):
                row = {**base, "phase": "prefill", "mode": mode, "batch": b, "seq_len": t, "context": 0,
                       "logits": logits}
                replay = None
                try:
                    if ids is None:
                        ids = ids_cpu.to(dev)
                    fn = partial(model, input_ids=ids, use_cache=False, **kw)
                    if mode == "graph":
                        replay = cuda_graph(fn)
                    row.update(_stats(time_ms(replay or fn, args.warmup, args.repeats, dev), b * t))
                except Exception as e:  # noqa: BLE001 - recorded per shape, the run goes on
                    row["error"] = _error(e)
                del replay
                _free(dev)
                rows.append(row)
                _print_row(row)
            del ids
    return rows


@torch.inference_mode()
def measure_decode(model, vocab: int, args: argparse.Namespace, base: dict[str, Any]) -> list[dict]:
    """Decode-step rows (eager, and graph on CUDA) for every decode batch size at ``--decode_context``."""
    dev, ctx = args.device, args.decode_context
    graphs = dev == "cuda" and args.graphs and args.decode_graphs
    ckw = _cache_kwarg(model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for b in args.decode_batch_sizes:
        common = {**base, "phase": "decode", "batch": b, "seq_len": 1, "context": ctx, "cache": "DynamicCache"}
        try:
            prompt = torch.randint(0, vocab, (b, ctx), generator=gen).to(dev)
            next_ids = torch.randint(0, vocab, (b, 1), generator=gen).to(dev)
            cache = _new_cache(model)
            model(input_ids=prompt, use_cache=True, **{ckw: cache})
            if int(cache.get_seq_length()) != ctx:
                raise RuntimeError(f"the prefill left {cache.get_seq_length()} cached tokens, expected {ctx}")
        except Exception as e:  # noqa: BLE001
            for mode in ("eager", "graph") if graphs else ("eager",):
                rows.append({**common, "mode": mode, "error": f"prefill of the cache: {_error(e)}"})
                _print_row(rows[-1])
            _free(dev)
            continue
        step = partial(model, input_ids=next_ids, use_cache=True, **{ckw: cache})
        row = {**common, "mode": "eager"}
        try:
            row.update(_stats(time_ms(step, args.warmup, args.repeats, dev, reset=partial(_crop_to, cache, ctx)), b))
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
            _free(dev)
        rows.append(row)
        _print_row(row)
        if graphs:
            row = {**common, "mode": "graph"}
            held: list = []  # every key/value tensor a captured step reads stays alive until the graph is gone

            def cropped_step(step=step, cache=cache, held=held):
                _crop_to(cache, ctx)
                held.append(_cache_tensors(cache))
                return step()

            replay = None
            try:
                replay = cuda_graph(cropped_step)
                row.update(_stats(time_ms(replay, args.warmup, args.repeats, dev), b))
            except Exception as e:  # noqa: BLE001
                row["error"] = _error(e)
            del replay, cropped_step
            _free(dev, sync=True)  # the graph is gone before the tensors it read are released
            held.clear()
            _free(dev)
            rows.append(row)
            _print_row(row)
        del cache, step, prompt, next_ids
        _free(dev)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``speedup`` = dense latency / latency for the same preset, phase, mode and shape (in place);
    2:4 rows also get ``wins`` (speed-up > 1)."""
    def key(r):
        return r["preset"], r["phase"], r["mode"], r["batch"], r["seq_len"], r["context"]

    dense = {key(r): r for r in rows if r["variant"] == "dense" and "latency_ms" in r}
    for r in rows:
        d = dense.get(key(r))
        if d is None or "latency_ms" not in r:
            continue
        r["dense_latency_ms"] = d["latency_ms"]
        r["speedup"] = d["latency_ms"] / r["latency_ms"]
        if r["variant"] == "2:4":
            r["wins"] = r["speedup"] > 1.0


def _shape(r: dict) -> str:
    if r["phase"] == "prefill":
        return f"{r['preset']} prefill {r['mode']} b{r['batch']} t{r['seq_len']}"
    return f"{r['preset']} decode {r['mode']} b{r['batch']} ctx{r['context']}"


def goals(rows: list[dict], device: str, variants: list[str]) -> dict[str, Any]:
    """Issue 7's two goals, each ``met`` True/False (``None`` when not measured), with the evidence."""
    out: dict[str, Any] = {}
    # structured: per prefill shape, the better of the eager and graph speed-ups
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if r["variant"] == "structured" and r["phase"] == "prefill" and "speedup" in r:
            k = (r["preset"], r["batch"], r["seq_len"])
            if k not in best or r["speedup"] > best[k][0]:
                best[k] = (r["speedup"], r["mode"])
    per_shape = [{"preset": p, "batch": b, "seq_len": t, "speedup": s, "mode": m} for (p, b, t), (s, m) in best.items()]
    unmeasured = sorted({_shape(r).replace(f" {r['mode']} ", " ") for r in rows
                         if r["variant"] == "structured" and r["phase"] == "prefill"
                         and (r["preset"], r["batch"], r["seq_len"]) not in best})
    out["structured_prefill"] = {
        "goal": f">= {GOAL_STRUCTURED_PREFILL}x dense prefill throughput on every prefill shape (best mode per shape)",
        "met": (all(x["speedup"] >= GOAL_STRUCTURED_PREFILL for x in per_shape) and not unmeasured
                if per_shape else None),
        "min_speedup": min((x["speedup"] for x in per_shape), default=None),
        "shapes_below": [x for x in per_shape if x["speedup"] < GOAL_STRUCTURED_PREFILL],
        "shapes_not_measured": unmeasured,
        "per_shape": per_shape,
    }
    sparse = [r for r in rows if r["variant"] == "2:4" and "speedup" in r]
    wins = [r for r in sparse if r["wins"]]
    note = None
    if device != "cuda" or "2:4" not in variants:
        note = "not measured: 2:4 needs CUDA" if device != "cuda" else "not measured: 2:4 left out of --variants"
    elif not sparse:
        note = "not measured: no 2:4 measurement succeeded (see the errors in variants and rows)"
    elif not wins:
        note = "2:4 wins on no shape"
    out["sparse_24"] = {
        "goal": f">= {GOAL_24_WHERE_WINS}x dense on every shape where 2:4 wins (speed-up > 1), prefill and decode",
        "met": (all(r["speedup"] >= GOAL_24_WHERE_WINS for r in wins) if wins else (False if sparse else None)),
        "note": note,
        "wins": [{"shape": _shape(r), "speedup": r["speedup"]} for r in wins],
        "loses": [{"shape": _shape(r), "speedup": r["speedup"]} for r in sparse if not r["wins"]],
        "failed": [{"shape": _shape(r), "error": r.get("error", "no dense baseline")} for r in rows
                   if r["variant"] == "2:4" and "speedup" not in r],
        "min_winning_speedup": min((r["speedup"] for r in wins), default=None),
    }
    return out


# ---------------------------------------------------------------------------------------------
# output


def _print_row(r: dict) -> None:
    shape = f"b{r['batch']} t{r['seq_len']}" if r["phase"] == "prefill" else f"b{r['batch']} ctx{r['context']}"
    if "error" in r:
        print(f"  {r['preset']:>5} {r['variant']:>10} {r['phase']:>7} {r['mode']:>5} {shape:>12}  ERROR {r['error']}",
              flush=True)
    else:
        print(f"  {r['preset']:>5} {r['variant']:>10} {r['phase']:>7} {r['mode']:>5} {shape:>12} "
              f"{r['latency_ms']:>10.3f} ms {r['tokens_per_s']:>14,.0f} tok/s", flush=True)


def print_table(rows: list[dict], linear_rows: list[dict], goal: dict[str, Any]) -> None:
    print(f"\n{'preset':>6} {'variant':>10} {'phase':>7} {'mode':>5} {'shape':>12} {'ms':>10} {'tokens/s':>14} "
          f"{'speed-up':>8} {'2:4 wins':>8}")
    order = {v: i for i, v in enumerate(VARIANTS)}
    presets = {p: i for i, p in enumerate(dict.fromkeys(r["preset"] for r in rows))}
    for r in sorted(rows, key=lambda r: (presets[r["preset"]], r["phase"] != "prefill", r["batch"], r["seq_len"], r["context"],
                                         r["mode"] != "eager", order[r["variant"]])):
        shape = f"b{r['batch']} t{r['seq_len']}" if r["phase"] == "prefill" else f"b{r['batch']} ctx{r['context']}"
        head = f"{r['preset']:>6} {r['variant']:>10} {r['phase']:>7} {r['mode']:>5} {shape:>12}"
        if "error" in r:
            print(f"{head} ERROR {r['error']}")
            continue
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        w = ("yes" if r["wins"] else "LOSES") if "wins" in r else ""
        print(f"{head} {r['latency_ms']:>10.3f} {r['tokens_per_s']:>14,.0f} {sp:>8} {w:>8}")
    if linear_rows:
        print(f"\nper linear shape, dense vs 2:4 F.linear (speed-up = dense ms / 2:4 ms)\n"
              f"{'preset':>6} {'out x in':>12} {'tokens':>7} {'eager':>8} {'graph':>8}")
        for r in linear_rows:
            head = f"{r['preset']:>6} {str(r['out']) + 'x' + str(r['in']):>12} {r['tokens']:>7}"
            if "error" in r:
                print(f"{head} ERROR {r['error']}")
            else:
                print(f"{head} {r['speedup']:>7.2f}x {r['speedup_graph']:>7.2f}x")
        losing = [f"{r['preset']} {r['out']}x{r['in']} @{r['tokens']} ({r['speedup_graph']:.2f}x)"
                  for r in linear_rows if "speedup_graph" in r and r["speedup_graph"] <= 1.0]
        print(f"linear shapes where 2:4 loses (graph): {', '.join(losing) if losing else 'none'}")
    s24 = goal["sparse_24"]
    if s24["note"] and s24["note"].startswith("not measured"):
        print(f"\n2:4: {s24['note']}")
    else:
        loses = [f"{x['shape']} ({x['speedup']:.2f}x)" for x in s24["loses"]]
        print(f"\n2:4 loses on {len(loses)} of {len(loses) + len(s24['wins'])} measured shapes: "
              f"{', '.join(loses) if loses else 'none'}")
        if s24["failed"]:
            print(f"2:4 not measured (error) on: {', '.join(x['shape'] for x in s24['failed'])}")
    st = goal["structured_prefill"]
    verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}
    detail = ""
    if st["per_shape"]:
        detail = f" (min {st['min_speedup']:.2f}x"
        if st["shapes_below"]:
            detail += "; below on " + ", ".join(f"{x['preset']} b{x['batch']} t{x['seq_len']} {x['speedup']:.2f}x"
                                                for x in st["shapes_below"])
        if st["shapes_not_measured"]:
            detail += "; not measured on " + ", ".join(st["shapes_not_measured"])
        detail += ")"
    print(f"goal, structured 50% prefill >= {GOAL_STRUCTURED_PREFILL}x dense: {verdict[st['met']]}{detail}")
    detail = ""
    if s24["wins"]:
        detail = f" (min winning {s24['min_winning_speedup']:.2f}x over {len(s24['wins'])} winning shapes)"
    elif s24["note"]:
        detail = f" ({s24['note']})"
    print(f"goal, 2:4 >= {GOAL_24_WHERE_WINS}x where it wins: {verdict[s24['met']]}{detail}")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for p in ("transformers", "torch-pruning"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def write_result(path: Path, args: argparse.Namespace, measured: list[str], variants: list[dict], rows: list[dict],
                 linear_rows: list[dict], goal: dict | None, complete: bool, t0: float) -> None:
    from pipeline.manifest import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    except Exception as e:  # noqa: BLE001
        device_name = f"? ({_error(e)})"
    atomic_write_json(path, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": complete, "elapsed_s": time.time() - t0,
        "device": args.device, "device_name": device_name, "versions": _versions(), "dtype": args.dtype,
        "args": dict(vars(args)), "variants_measured": measured, "variants": variants, "rows": rows,
        "linear_shapes": linear_rows, "goals": goal,
    })


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    variants = [v for v in VARIANTS if v in args.variants]
    if "2:4" in variants and args.device != "cuda":
        print("2:4 is measured on CUDA only (torch.sparse.to_sparse_semi_structured has no CPU kernel): "
              "measuring dense and structured", flush=True)
        variants.remove("2:4")
    path = Path(args.out) / f"sparse-{time.strftime('%Y%m%d-%H%M%S')}.json"
    infos: list[dict] = []
    rows: list[dict] = []
    linear_rows: list[dict] = []
    for preset in args.presets:
        tp = time.time()
        base, vocab = build_dense(preset, args)
        print(f"{preset}: built in {time.time() - tp:.1f} s ({_n_params(base)[0]:,} parameters)", flush=True)
        for name in variants:
            tv = time.time()
            info: dict[str, Any] = {"preset": preset, "variant": name}
            model = None
            try:
                model, made = make_variant(name, base, args, vocab)
                info.update(made)
            except Exception as e:  # noqa: BLE001 - a variant that cannot be made is reported, the others go on
                info["error"] = _error(e)
                print(f"{preset} {name}: cannot be made: {info['error']}", flush=True)
            infos.append(info)
            if model is not None:
                print(f"{preset} {name}: {info['n_params']:,} parameters ({info['nonzero_params']:,} non-zero), "
                      f"made in {time.time() - tv:.1f} s", flush=True)
                common = {"preset": preset, "variant": name}
                rows += measure_prefill(model, vocab, args, common)
                rows += measure_decode(model, vocab, args, common)
                info["measure_s"] = time.time() - tv
            del model
            _free(args.device)
        if args.device == "cuda" and "2:4" in variants:
            shapes = sorted({tuple(m.weight.shape) for m in prunable_linears(base).values()})
            try:
                lr = linear_shape_bench(shapes, args.linear_tokens, DTYPES[args.dtype], args.warmup, args.repeats,
                                        args.seed)
            except Exception as e:  # noqa: BLE001
                lr = [{"out": o, "in": i, "tokens": 0, "error": _error(e)} for o, i in shapes]
            linear_rows += [{"preset": preset, **r} for r in lr]
            _free(args.device)
        del base
        _free(args.device)
        add_speedups(rows)
        write_result(path, args, variants, infos, rows, linear_rows, None, False, t0)
        print(f"{preset}: done in {time.time() - tp:.1f} s (partial results in {path})", flush=True)
    add_speedups(rows)
    goal = goals(rows, args.device, variants)
    write_result(path, args, variants, infos, rows, linear_rows, goal, True, t0)
    print_table(rows, linear_rows, goal)
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    main()
