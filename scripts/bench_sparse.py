"""Inference speed of sparse models against dense on the same shapes: 2:4 semi-structured weights and a
50% structured (width-pruned) model, prefill and decode, with the speed-up, and the shapes where 2:4 loses.

    python scripts/bench_sparse.py [--presets 124m,350m] [--variants ...] [--batch_sizes 1,8,32]
        [--seq_lens 128,1024] [--goal_shape 16x1024] [--decode_batch_sizes 1,16] [--prompt_len 128]
        [--gen_tokens 32] [--profile --profile_presets 350m,1b] [--time_budget S] [--quick]
        [--repeats 20] [--warmup 5] [--device cuda|cpu] [--dtype fp16] [--out results/bench]

For each preset (``pipeline/presets.py``: the ``pretrain.model`` shape and the ``data.vocab_size``) one
randomly initialised LLaMA (fixed ``--seed``) is built and measured as these variants (``--variants``):

- ``dense``: the model as built, the baseline of every speed-up;
- ``structured``: stage 03's width pruning (``pipeline.prune.prune_model`` with ``method="structured"``,
  ``--sparsity`` 0.5): half of the attention heads (key/value groups) and of the MLP channels removed in every
  block, a genuinely smaller dense model (``n_params`` of each variant is in the JSON);
- ``2:4`` (CUDA only): stage 03's ``nm`` masks (the 2 largest ``|w|`` of every 4 along the input dimension,
  ``pipeline.sparsity.compute_masks``/``apply_masks``) on the block linears, then
  ``pipeline.evaluate.to_semi_structured`` turns the weights into ``torch.sparse.to_sparse_semi_structured``
  tensors.  ``max_abs_logit_diff`` against the same masked weights run dense checks the conversion.
  The 2:4 variants differ in the conversion's options (:data:`SPARSE_VARIANTS`): ``2:4`` copies every sparse
  output to contiguous memory (stage 05 up to cb49447); ``2:4+ft`` lets cuSPARSELt write the output row-major
  (``fuse_transpose``) so no copy is needed; ``2:4+attn`` copies only q/k/v (attention's fused kernels need a
  dense last dimension) and passes the MLP's transposed outputs on; ``+fuse`` fuses q/k/v and gate/up into one
  sparse matmul each; ``+search`` picks cuSPARSELt's algorithm per weight for the ``--goal_shape`` tokens;
  ``+compile`` runs the forward through ``torch.compile``;
- controls: ``dense+fuse`` (the dense model with the same fused projections: what fusion alone buys) and
  ``dense+compile``.  The 2:4 masks are computed once per preset and shared by every 2:4 variant.

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
- ``decode_static`` (``--static_decode``, on by default): greedy decoding as a server runs it
  (``pipeline/decode.py``: ``StaticCache``, the one-token step replayed from a CUDA graph on CUDA, eager on
  CPU) of a ``--prompt_len`` random prompt by ``--gen_tokens`` tokens, the ``--decode_variants`` interleaved in
  ``--decode_rounds`` rounds; ``latency_ms`` is ms per token, ``ttft_ms`` the prefill with its first token;
  the older single-step ``DynamicCache`` rows come with ``--dynamic_decode``;
- ``--profile``: ``torch.profiler`` over eager prefill passes at ``--goal_shape`` of the ``--profile_variants``
  on the ``--profile_presets``: kernel time per op category (:func:`op_category`: sparse mm, dense mm, LM head,
  attention, layout copies, dtype conversions, padding, norms, other), the largest kernels, matmul time per
  linear module in the model against the same shape alone, and the kernels of the graphed pass (their sum
  against the replay's latency: the GPU's busy share); written to ``<out>/profile-<stamp>.txt`` and the JSON;
- per linear-layer shape (CUDA only): ``pipeline.evaluate.linear_shape_bench``, dense ``F.linear`` against 2:4
  on every distinct ``(out, in)`` weight shape of the preset's block linears at ``--linear_tokens`` tokens.

Units: latency in milliseconds (``latency_ms``: median; ``latency_min_ms``/``latency_max_ms``), throughput in
tokens/s (prefill: ``batch * seq_len`` / latency; decode: ``batch`` new tokens / step latency), speed-up =
dense latency / variant latency for the same preset, phase, shape and mode (>1: faster than dense).  Every
2:4 row carries ``wins`` (speed-up > 1); the shapes where 2:4 loses are printed, not hidden.  A measurement
that fails (a kernel refusing a shape, out of memory, a capture that fails) records its ``error`` and the run
goes on.

Goals of issue 18 (:func:`goals_18`, printed as met or not): the best 2:4 variant's whole-model graphed prefill at
``--goal_shape`` >= 1.15x dense on ``1b`` and >= 1.05x on ``350m``; structured >= 1.6x there on both;
structured static decode >= 1.3x dense tok/s on ``1b``; every dense-kernel student (structured, dense+fuse) at
least as fast as dense in static decode at every batch.  ``--time_budget`` stops starting new work once spent
(the skipped parts are listed in ``skipped``); ``--quick`` caps repeats and lengths for a dry pass.

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
import re
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

#: 2:4 variants: the options of ``pipeline.evaluate.to_semi_structured`` each one converts with
#: (``+compile``: the converted model's forward through ``torch.compile`` as well)
SPARSE_VARIANTS: dict[str, dict[str, Any]] = {
    "2:4": {"fuse_transpose": False, "contiguous": "all"},  # stage 05's conversion up to cb49447
    "2:4+ft": {"fuse_transpose": True, "contiguous": "auto"},
    "2:4+attn": {"fuse_transpose": False, "contiguous": "attention"},
    "2:4+ft+fuse": {"fuse_transpose": True, "contiguous": "auto", "fuse_projections": True},
    "2:4+ft+fuse+search": {"fuse_transpose": True, "contiguous": "auto", "fuse_projections": True,
                           "alg_search_tokens": -1},  # -1: the --profile_shape's tokens
    "2:4+ft+fuse+compile": {"fuse_transpose": True, "contiguous": "auto", "fuse_projections": True},
}
#: dense controls: the dense model with fused q/k/v and gate/up projections (the fusion alone), compiled
VARIANTS = ("dense", "structured", "dense+fuse", "dense+compile", *SPARSE_VARIANTS)
# the fused-transpose variants (+ft) are opt-in: one eager 124m prefill took 15.8 s on the H200 (NOTES, 2026-12-03)
DEFAULT_VARIANTS = ("dense", "structured", "dense+fuse", "2:4", "2:4+attn")
#: issue 18's goals: whole-model 2:4 prefill at --goal_shape (graphed), per preset; structured prefill;
#: structured decode on 1b (static KV cache, graphed)
GOAL_24_MODEL = {"1b": 1.15, "350m": 1.05}
GOAL_STRUCTURED_PREFILL_18 = {"1b": 1.6, "350m": 1.6}
GOAL_STRUCTURED_DECODE = {"1b": 1.3}


def is_sparse(variant: str) -> bool:
    """True for the 2:4 variants (CUDA only)."""
    return variant.startswith("2:4")
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


def _shape_arg(text: str) -> tuple[int, int]:
    """``BxT`` (batch x sequence length), e.g. ``16x1024``."""
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not BATCHxSEQ_LEN, e.g. 16x1024") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"'{text}': batch and sequence length must be positive")
    return b, t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument; any problem is an argparse error (exit 2) before any work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", type=_names, default=["124m", "350m"],
                    help=f"comma-separated presets from pipeline/presets.py ({', '.join(PRESETS)})")
    ap.add_argument("--variants", type=_names, default=list(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {','.join(VARIANTS)} (dense is required: the baseline; "
                         f"default {','.join(DEFAULT_VARIANTS)})")
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
    ap.add_argument("--dynamic_decode", action=argparse.BooleanOptionalAction, default=False,
                    help="also the single decode step with a DynamicCache at --decode_context (eager, and graph with "
                         "--decode_graphs): the rows before issue 18")
    ap.add_argument("--static_decode", action=argparse.BooleanOptionalAction, default=True,
                    help="greedy decoding as a server runs it (pipeline/decode.py: static KV cache, the step replayed "
                         "from a CUDA graph on CUDA, eager on CPU): TTFT, ms/token, tok/s, variants interleaved")
    ap.add_argument("--decode_variants", type=_names, default=["dense", "structured", "dense+fuse", "2:4"],
                    help="variants of the static decode rows (those not in --variants are left out)")
    ap.add_argument("--prompt_len", type=int, default=128, help="static decode: prompt tokens")
    ap.add_argument("--gen_tokens", type=int, default=32, help="static decode: new tokens per generation")
    ap.add_argument("--decode_rounds", type=int, default=2, help="static decode: interleaved rounds")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.profiler over eager prefill at --goal_shape (kernel time per op category, per linear "
                         "shape in-model), and kernel names of the graphed prefill")
    ap.add_argument("--profile_presets", type=_names, default=["350m", "1b"], help="presets profiled")
    ap.add_argument("--profile_variants", type=_names,
                    default=["dense", "structured", "2:4", "2:4+ft", "2:4+attn", "2:4+ft+fuse"],
                    help="variants profiled (those not in --variants are left out)")
    ap.add_argument("--profile_steps", type=int, default=3, help="profiled forward passes per variant")
    ap.add_argument("--goal_shape", type=_shape_arg, default=(16, 1024),
                    help="BxT prefill shape of issue 18's goals and of the profile (default 16x1024); it is added to "
                         "the prefill shapes when missing")
    ap.add_argument("--time_budget", type=float, default=0.0,
                    help="seconds: once spent, the remaining presets and measurements are skipped (recorded in "
                         "'skipped'), and the results so far are written (0: no limit)")
    ap.add_argument("--quick", action="store_true",
                    help="a fast pass: at most 5 repeats and 2 warm-ups, 16 generated tokens, 1 decode round, "
                         "2 profiled steps")
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
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 2)
        args.gen_tokens, args.decode_rounds, args.profile_steps = min(args.gen_tokens, 16), 1, min(args.profile_steps, 2)
    for k in ("decode_context", "repeats", "prompt_len", "gen_tokens", "decode_rounds", "profile_steps"):
        if getattr(args, k) < 1:
            problems.append(f"--{k} must be positive, got {getattr(args, k)}")
    if args.warmup < 0:
        problems.append(f"--warmup must be 0 or more, got {args.warmup}")
    unknown_pp = [p for p in args.profile_presets if p not in PRESETS]
    if args.profile and unknown_pp:
        problems.append(f"--profile_presets: unknown preset(s) {', '.join(unknown_pp)}")
    if args.time_budget < 0:
        problems.append(f"--time_budget must be 0 (none) or positive seconds, got {args.time_budget}")
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
    longest = max(seq, max(args.seq_lens), args.decode_context + 1, args.goal_shape[1],
                  args.prompt_len + max(args.gen_tokens, 4))
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


_MASKED: dict[str, Any] = {}  # the last base model and its 2:4-masked copy


def make_variant(name: str, base, args: argparse.Namespace, vocab: int) -> tuple[Any, dict[str, Any]]:
    """A copy of ``base`` turned into variant ``name``, on ``--device`` in ``--dtype``, eval mode; and its
    description (``n_params``, ``nonzero_params``, shape; structured: the plan; 2:4: ``n_converted`` layers,
    ``skipped`` ones with the reason, and ``max_abs_logit_diff``).

    Pruning runs on the CPU copy in fp32 (as the GPU runs' stage-03 stand-in did), so the device sees only
    the finished model.  Structured pruning uses ``--structured_backend`` (default ``manual``: the same plan
    and resulting shapes as stage 03's ``auto``, without tracing torch-pruning's dependency graph,
    which is known to hang on some model/library combinations; speed depends only on the shapes)."""
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    info: dict[str, Any] = {}
    if is_sparse(name):  # the 2:4 masks are computed once per base model and shared by every 2:4 variant
        if _MASKED.get("base") is not base:
            from pipeline.sparsity import apply_masks, compute_masks

            _MASKED.clear()
            masked = copy.deepcopy(base)
            apply_masks(masked, compute_masks(masked, "nm", n=2, m=4))
            _MASKED.update(base=base, masked=masked)
        model = copy.deepcopy(_MASKED["masked"])
    else:
        model = copy.deepcopy(base)
    if name == "structured":
        from pipeline.prune import PruneConfig, prune_model

        cfg = PruneConfig(method="structured", sparsity=args.sparsity, structured_backend=args.structured_backend,
                          device="cpu", seed=args.seed)
        info["plan"] = prune_model(model, cfg)["plan"]
    model = model.to(device=dev, dtype=dtype).eval()
    info["n_params"], info["nonzero_params"] = _n_params(model)
    info.update(_shape_info(model))
    if name == "dense+fuse":
        from pipeline.evaluate import fuse_sibling_projections

        info["n_fused"] = len(fuse_sibling_projections(model))
    if is_sparse(name):
        opts = dict(SPARSE_VARIANTS[name])
        if opts.get("alg_search_tokens") == -1:
            opts["alg_search_tokens"] = args.goal_shape[0] * args.goal_shape[1]
        info["options"] = opts
        ids = torch.randint(0, vocab, (1, min(args.seq_lens)), generator=torch.Generator().manual_seed(args.seed))
        ids = ids.to(dev)
        with torch.inference_mode():
            ref = model(input_ids=ids, use_cache=False).logits.float()
        converted, skipped = to_semi_structured(model, **opts)
        info["n_converted"], info["skipped"] = len(converted), skipped  # skipped: layer -> reason
        info["n_fused_modules"] = sum(1 for m in model.modules() if type(m).__name__ == "FusedProjections")
        if not converted:
            raise RuntimeError(f"no layer converted to 2:4 (first refusal: {next(iter(skipped.values()), '?')})")
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False).logits.float()
        info["max_abs_logit_diff"] = float((out - ref).abs().max())
        del ref, out
    if name.endswith("+compile"):
        # the forward through torch.compile (Inductor), then timed eagerly and captured in CUDA graphs like the
        # others; compiled here, outside every timing, on the first prefill shape
        model.forward = torch.compile(model.forward, dynamic=False)
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


def prefill_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Every (batch, seq_len) of ``--batch_sizes`` x ``--seq_lens``, and ``--goal_shape`` when missing."""
    shapes = [(b, t) for b in args.batch_sizes for t in args.seq_lens]
    return shapes if tuple(args.goal_shape) in shapes else [*shapes, tuple(args.goal_shape)]


@torch.inference_mode()
def measure_prefill(model, vocab: int, args: argparse.Namespace, base: dict[str, Any]) -> list[dict]:
    """Prefill rows (eager, and graph on CUDA) for every :func:`prefill_shapes`; ``base`` fills the common
    fields."""
    dev = args.device
    graphs = dev == "cuda" and args.graphs
    kw, logits = _prefill_kwargs(model, args.prefill_logits)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for b, t in prefill_shapes(args):
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


def measure_static_decode(models: dict[str, Any], vocab: int, args: argparse.Namespace, preset: str) -> list[dict]:
    """Static-KV-cache greedy decoding rows (``phase`` ``decode_static``), every model of ``models``
    interleaved (``pipeline.decode.measure_decode``): ``--prompt_len`` random prompt tokens, ``--gen_tokens`` new
    ones, each of ``--decode_batch_sizes``; ``mode`` is the path (``graph`` on CUDA, no eager fallback: a failed
    capture is the row's error; ``eager`` on CPU). ``latency_ms`` is ms per token, ``tokens_per_s`` new tokens/s
    over the batch, ``ttft_ms`` the prefill with its first token."""
    from pipeline.decode import measure_decode

    path = "graph" if args.device == "cuda" else "eager"
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 2))
    res = measure_decode(models, prompt.to(args.device), args.decode_batch_sizes, args.gen_tokens, warmup=1,
                         repeats=max(2, args.repeats // 4), path=path, rounds=args.decode_rounds, fallback=False)
    rows = []
    for name, by_batch in res.items():
        for key, d in by_batch.items():
            row = {"preset": preset, "variant": name, "phase": "decode_static", "mode": d.get("path", path),
                   "batch": int(key[1:]), "seq_len": 1, "context": args.prompt_len, "new_tokens": args.gen_tokens,
                   "cache": "StaticCache"}
            if "error" in d or not d.get("ms_per_token"):
                row["error"] = d.get("error", "no decode step timed")
            else:
                row.update(latency_ms=d["ms_per_token"], latency_min_ms=d["ms_per_token_min"],
                           latency_max_ms=d["ms_per_token_max"], tokens_per_s=d["tok_s"], ttft_ms=d["ttft_ms"],
                           repeats=d["repeats"])
                if "tokens_match_eager" in d:
                    row["tokens_match_eager"] = d["tokens_match_eager"]
            rows.append(row)
            _print_row(row)
    return rows


# ---------------------------------------------------------------------------------------------
# profiling: where the time of a whole-model prefill goes

CATEGORIES = ("sparse mm", "dense mm", "LM head", "attention", "layout copy", "dtype conversion", "padding",
              "norms", "other copies", "elementwise/other")
_RUNTIME_CALL = re.compile(r"^(cuda|cu[A-Z]|hip)")
_DENSE_MM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def op_category(name: str, ancestors: list[str]) -> str:
    """The category of one kernel (CUDA) or one op's own time (CPU): from the ops and module labels that
    launched it (``ancestors``, innermost first: the op itself, then its callers), else from its name.

    - ``LM head``: anything under the ``lm_head`` module; ``sparse mm``: under cuSPARSELt's / CUTLASS's
      semi-structured ops; ``layout copy``: ``aten::contiguous``/``clone`` (e.g. the copy of a transposed sparse
      output); ``dtype conversion``: ``aten::to``/``_to_copy``; ``padding``: ``constant_pad_nd`` (the sparse
      kernel's input padding); ``attention``: scaled-dot-product attention; ``dense mm``: ``mm``/``addmm``/
      ``bmm``/``matmul``/``linear``; ``norms``: under a norm module or an ``rms_norm`` op; ``other copies``:
      ``copy_``; ``elementwise/other``: the rest (RoPE, SiLU, residual adds, masks, embedding).
    """
    ancestors = [a for a in ancestors if not _RUNTIME_CALL.match(a)]  # cudaLaunchKernel, cudaGraphLaunch, ...
    anc = set(ancestors)
    low = [a.lower() for a in ancestors]

    def any_has(*keys: str) -> bool:
        return any(k in a for a in low for k in keys)

    n = name.lower()
    if any(a.startswith("lm_head") for a in ancestors):
        return "LM head"
    if any_has("cslt", "cusparselt", "_sparse_semi_structured") or (not ancestors and ("sparse" in n or "spmma" in n)):
        return "sparse mm"
    if anc & {"aten::contiguous", "aten::clone"}:
        return "layout copy"
    if anc & {"aten::_to_copy", "aten::to"}:
        return "dtype conversion"
    if anc & {"aten::constant_pad_nd", "aten::pad"}:
        return "padding"
    if any_has("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention") or (
            not ancestors and ("flash" in n or "fmha" in n or "attention" in n)):
        return "attention"
    if anc & _DENSE_MM_OPS or (not ancestors and any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma"))):
        return "dense mm"
    if any(a == "norm" for a in ancestors) or any_has("rms_norm", "layer_norm"):
        return "norms"
    if "aten::copy_" in anc or (not ancestors and ("copy" in n or "transpose" in n)):
        return "other copies"
    return "elementwise/other"


def _module_labels(model) -> list:
    """Forward hooks that wrap the LM head, every linear-like module and every norm in a profiler range
    (``lm_head``, ``linear:<name> <out>x<in>``, ``norm``); returns the hook handles."""
    from torch import nn

    from pipeline.evaluate import FusedProjectionPart, FusedProjections

    out_emb = model.get_output_embeddings()
    # a FusedProjections module's label is its registered name (the architecture's ``qkv_fused``, ``gate_up_fused``)
    fused_names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, FusedProjections)}
    handles, stack = [], []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if m is out_emb:
            label = "lm_head"
        elif isinstance(m, nn.Linear):
            label = f"linear:{leaf} {m.weight.shape[0]}x{m.weight.shape[1]}"
        elif isinstance(m, FusedProjectionPart):
            w = m._fused[0].weight
            label = (f"linear:{fused_names.get(id(m._fused[0]), 'fused')} {w.shape[0]}x{w.shape[1]}"
                     if m.index == 0 else f"linear:{leaf} (fused part)")
        elif "norm" in leaf:
            label = "norm"
        else:
            continue

        def pre(mod, args, label=label):
            stack.append(torch.profiler.record_function(label).__enter__())

        def post(mod, args, output):
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def _ancestors(e) -> list[str]:
    out, p = [], e
    while p is not None:
        out.append(p.name)
        p = p.cpu_parent
    return out


def _items(prof, cuda: bool) -> list[tuple[str, float, list[str]]]:
    """(kernel or op name, milliseconds, ancestors) of everything the profile timed: CUDA kernels with the ops
    that launched them, or (CPU) each op's own time."""
    from torch.autograd import DeviceType

    items = []
    events = prof.events()
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if cuda:
            if e.kernels:
                anc = _ancestors(e)
                items += [(k.name, k.duration / 1e3, anc) for k in e.kernels]
        elif e.self_cpu_time_total > 0 and e.name.startswith(("aten::", "semi_structured::")):
            items.append((e.name, e.self_cpu_time_total / 1e3, _ancestors(e)))
    if cuda and not items:  # kernels not linked to ops (e.g. graph replays): by kernel name only
        items = [(e.name, (e.time_range.end - e.time_range.start) / 1e3, []) for e in events
                 if e.device_type == DeviceType.CUDA]
    return items


def _breakdown(items, steps: int, label_counts: dict[str, int]) -> dict[str, Any]:
    cats = dict.fromkeys(CATEGORIES, 0.0)
    kernels: dict[tuple[str, str], list] = {}
    linear: dict[str, float] = {}
    for name, ms, anc in items:
        c = op_category(name, anc)
        cats[c] += ms / steps
        k = kernels.setdefault((name, c), [0.0, 0])
        k[0] += ms / steps
        k[1] += 1
        if c in ("sparse mm", "dense mm", "LM head"):
            lab = next((a for a in anc if a.startswith(("linear:", "lm_head"))), None)
            if lab is not None:
                linear[lab] = linear.get(lab, 0.0) + ms / steps
    total = sum(cats.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "ms_per_forward": total,
        "categories": {c: v for c, v in cats.items() if v > 0},
        "top": [{"name": n[:160], "category": c, "ms_per_forward": ms, "calls_per_forward": cnt / steps}
                for (n, c), (ms, cnt) in top],
        "linear": [{"label": lab, "ms_per_forward": ms, "calls_per_forward": label_counts.get(lab, 0) / steps,
                    "ms_per_call": ms / (label_counts[lab] / steps) if label_counts.get(lab) else None}
                   for lab, ms in sorted(linear.items(), key=lambda kv: -kv[1])],
    }


@torch.inference_mode()
def profile_prefill(model, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """``torch.profiler`` over ``--profile_steps`` eager prefill passes at ``--goal_shape`` (after 2 warm-up
    passes), kernel time per :func:`op_category`, the 15 largest kernels, and per linear module label the
    matmul time in the model; on CUDA also the kernels of ``--profile_steps`` CUDA-graph replays of the same
    pass (by kernel name: a graph hides the ops), whose sum against the replay's latency is the GPU's idle
    share.  Milliseconds per forward pass."""
    from torch.profiler import ProfilerActivity, profile

    dev = args.device
    cuda = dev == "cuda"
    b, t = args.goal_shape
    kw, _ = _prefill_kwargs(model, args.prefill_logits)
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(args.seed)).to(dev)
    fn = partial(model, input_ids=ids, use_cache=False, **kw)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out: dict[str, Any] = {"shape": f"b{b} t{t}", "steps": args.profile_steps}
    handles = _module_labels(model)
    try:
        for _ in range(2):
            fn()
        _free(dev, sync=True)
        with profile(activities=acts) as prof:
            for _ in range(args.profile_steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        counts: dict[str, int] = {}
        for e in prof.events():
            if e.name.startswith(("linear:", "lm_head")):
                counts[e.name] = counts.get(e.name, 0) + 1
        out["eager"] = _breakdown(_items(prof, cuda), args.profile_steps, counts)
    finally:
        for h in handles:
            h.remove()
    if cuda and args.graphs:
        replay = None
        try:
            replay = cuda_graph(fn)
            out["graph_latency_ms"] = statistics.median(time_ms(replay, 2, args.repeats, dev))
            with profile(activities=acts) as prof:
                for _ in range(args.profile_steps):
                    replay()
                torch.cuda.synchronize()
            out["graph"] = _breakdown(_items(prof, True), args.profile_steps, {})
            out["graph"].pop("linear", None)
            out["graph_busy_share"] = out["graph"]["ms_per_forward"] / out["graph_latency_ms"]
        except Exception as e:  # noqa: BLE001
            out["graph_error"] = _error(e)
        del replay
    del ids
    _free(dev)
    return out


@torch.inference_mode()
def profile_decode(model, vocab: int, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """``torch.profiler`` over the eager static-cache decode steps of one generation (``batch`` sequences,
    ``--prompt_len`` + ``--gen_tokens``): kernel time per op category and per linear label, per decode step
    (the same kernels a CUDA-graph replay runs, without the host's launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.decode import StaticDecoder

    cuda = args.device == "cuda"
    dec = StaticDecoder(model, batch, args.prompt_len, args.gen_tokens, "eager")
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 3))
    prompt = prompt.to(args.device)
    dec.generate(prompt)
    handles = _module_labels(model)
    try:
        dec.prefill(prompt)
        _free(args.device, sync=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            dec.decode()
            if cuda:
                torch.cuda.synchronize()
        counts: dict[str, int] = {}
        for e in prof.events():
            if e.name.startswith(("linear:", "lm_head")):
                counts[e.name] = counts.get(e.name, 0) + 1
        steps = max(args.gen_tokens - 1, 1)
        out = {"shape": f"decode b{batch} ctx{args.prompt_len}+{args.gen_tokens}", "steps": steps,
               "eager": _breakdown(_items(prof, cuda), steps, counts)}
    finally:
        for h in handles:
            h.remove()
    del dec
    _free(args.device)
    return out


def profile_text(profiles: list[dict], linear_rows: list[dict]) -> str:
    """The profiles as text tables: per preset, ms per forward by category (one column per variant), the
    graphed latency and the GPU's busy share, then matmul ms per call of each linear label in the model against
    the same shape alone (``linear_shapes``, CUDA graph), then each variant's largest kernels."""
    lines = []
    iso = {(r["preset"], r["out"], r["in"], r["tokens"]): r for r in linear_rows if "error" not in r}
    for preset, phase in dict.fromkeys((p["preset"], p.get("phase", "prefill")) for p in profiles):
        ps = [p for p in profiles if p["preset"] == preset and p.get("phase", "prefill") == phase and "eager" in p]
        if not ps:
            continue
        shape = ps[0]["shape"]
        if phase == "decode":
            tokens = int(shape.split()[1][1:])
            lines += [f"== {preset}, {shape}, ms per decode step (eager kernels by op category) ==", ""]
        else:
            tokens = int(shape.split()[0][1:]) * int(shape.split()[1][1:])
            lines += [f"== {preset}, prefill {shape} ({tokens} tokens), ms per forward pass "
                      f"(eager kernels by op category; graph: replay latency and kernel sum) ==", ""]
        head = f"{'category':<22}" + "".join(f"{p['variant']:>14}" for p in ps)
        lines.append(head)
        for c in CATEGORIES:
            if any(c in p["eager"]["categories"] for p in ps):
                lines.append(f"{c:<22}" + "".join(f"{p['eager']['categories'].get(c, 0.0):>14.3f}" for p in ps))
        lines.append(f"{'kernel sum (eager)':<22}" + "".join(f"{p['eager']['ms_per_forward']:>14.3f}" for p in ps))
        for key, title in (("graph_latency_ms", "graph latency"),):
            lines.append(f"{title:<22}" + "".join(f"{p.get(key, float('nan')):>14.3f}" for p in ps))
        lines.append(f"{'graph kernel sum':<22}" + "".join(
            f"{p.get('graph', {}).get('ms_per_forward', float('nan')):>14.3f}" for p in ps))
        lines.append(f"{'graph busy share':<22}" + "".join(f"{p.get('graph_busy_share', float('nan')):>14.2f}"
                                                            for p in ps))
        dense = next((p for p in ps if p["variant"] == "dense"), None)
        if dense is not None and dense.get("graph_latency_ms"):
            lines.append(f"{'speed-up (graph)':<22}" + "".join(
                f"{dense['graph_latency_ms'] / p['graph_latency_ms']:>13.2f}x" if p.get("graph_latency_ms")
                else f"{'-':>14}" for p in ps))
        lines += ["", f"matmul ms per call in the model (eager kernels) vs the same shape alone at {tokens} tokens "
                      f"(linear_shapes, CUDA graph; dense | 2:4)", ""]
        for p in ps:
            for lin in p["eager"]["linear"]:
                if lin["ms_per_call"] is None:
                    continue
                alone = ""
                try:
                    o, i = (int(x) for x in lin["label"].split()[-1].split("x"))
                    r = iso.get((preset, o, i, tokens))
                    if r is not None:
                        alone = f"  alone: dense {r['dense_graph_ms']:.4f} | 2:4 {r['sparse_graph_ms']:.4f}"
                except ValueError:
                    pass
                lines.append(f"  {p['variant']:<20} {lin['label']:<36} {lin['ms_per_call']:>9.4f} ms x "
                             f"{lin['calls_per_forward']:>5.1f}{alone}")
        for p in ps:
            lines += ["", f"largest kernels, {preset} {p['variant']} (eager; ms per forward, calls per forward)"]
            lines += [f"  {k['ms_per_forward']:>9.3f} {k['calls_per_forward']:>6.1f}  {k['category']:<18} "
                      f"{k['name'][:110]}" for k in p["eager"]["top"][:10]]
            if p.get("graph"):
                lines += [f"  graph: {k['ms_per_forward']:>9.3f} {k['calls_per_forward']:>6.1f}  {k['category']:<18} "
                          f"{k['name'][:100]}" for k in p["graph"]["top"][:6]]
        lines.append("")
    return "\n".join(lines)


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
        if is_sparse(r["variant"]):
            r["wins"] = r["speedup"] > 1.0


def _shape(r: dict) -> str:
    if r["phase"] == "prefill":
        return f"{r['preset']} prefill {r['mode']} b{r['batch']} t{r['seq_len']}"
    return f"{r['preset']} {r['phase']} {r['mode']} b{r['batch']} ctx{r['context']}"


def goals(rows: list[dict], device: str, variants: list[str], goal_shape: tuple[int, int] = (16, 1024)
          ) -> dict[str, Any]:
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
    sparse = [r for r in rows if r["variant"] == "2:4" and "speedup" in r and r["phase"] != "decode_static"]
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
                   if r["variant"] == "2:4" and "speedup" not in r and r["phase"] != "decode_static"],
        "min_winning_speedup": min((r["speedup"] for r in wins), default=None),
    }
    out.update(goals_18(rows, goal_shape))
    return out


def goals_18(rows: list[dict], goal_shape: tuple[int, int] = (16, 1024)) -> dict[str, Any]:
    """Issue 18's goals from the rows (speed-ups against dense in the same run), each ``met`` True/False, or
    ``None`` when its rows were not measured:

    - ``model_24``: per preset of :data:`GOAL_24_MODEL`, the best 2:4 variant's graphed prefill speed-up at
      ``goal_shape``;
    - ``structured_prefill_18``: structured graphed prefill at ``goal_shape`` (:data:`GOAL_STRUCTURED_PREFILL_18`);
    - ``structured_decode``: structured static-cache decode tok/s at every decode batch (:data:`GOAL_STRUCTURED_DECODE`);
    - ``decode_not_slower``: every non-2:4 student variant (structured, dense+fuse) at least as fast as dense in
      static-cache decoding at every batch (the dense-weight students of stage 05 decode with dense kernels).
    """
    b, t = goal_shape

    def prefill(preset, variant_ok):
        return [r for r in rows if r["preset"] == preset and variant_ok(r["variant"]) and r["phase"] == "prefill"
                and r["mode"] == "graph" and r["batch"] == b and r["seq_len"] == t and "speedup" in r]

    out: dict[str, Any] = {}
    per = {}
    for preset, target in GOAL_24_MODEL.items():
        rs = prefill(preset, is_sparse)
        if rs:
            best = max(rs, key=lambda r: r["speedup"])
            per[preset] = {"target": target, "best_variant": best["variant"], "speedup": best["speedup"],
                           "met": best["speedup"] >= target,
                           "all": {r["variant"]: r["speedup"] for r in rs}}
    out["model_24"] = {"goal": f"2:4 whole model graphed prefill at b{b} t{t}: "
                               + ", ".join(f"{p} >= {x}x" for p, x in GOAL_24_MODEL.items()),
                       "met": all(v["met"] for v in per.values()) if len(per) == len(GOAL_24_MODEL) else
                       (False if any(not v["met"] for v in per.values()) else None),
                       "per_preset": per}
    per = {}
    for preset, target in GOAL_STRUCTURED_PREFILL_18.items():
        rs = prefill(preset, lambda v: v == "structured")
        if rs:
            per[preset] = {"target": target, "speedup": rs[0]["speedup"], "met": rs[0]["speedup"] >= target}
    out["structured_prefill_18"] = {"goal": f"structured 50% graphed prefill at b{b} t{t}: "
                                            + ", ".join(f"{p} >= {x}x" for p, x in GOAL_STRUCTURED_PREFILL_18.items()),
                                    "met": (all(v["met"] for v in per.values()) if per else None), "per_preset": per}
    dec = [r for r in rows if r["phase"] == "decode_static" and "speedup" in r]
    per = {}
    for preset, target in GOAL_STRUCTURED_DECODE.items():
        rs = [r for r in dec if r["preset"] == preset and r["variant"] == "structured"]
        if rs:
            per[preset] = {"target": target, "per_batch": {r["batch"]: r["speedup"] for r in rs},
                           "met": all(r["speedup"] >= target for r in rs)}
    out["structured_decode"] = {"goal": "structured 50% static-cache decode tok/s: "
                                        + ", ".join(f"{p} >= {x}x" for p, x in GOAL_STRUCTURED_DECODE.items()),
                                "met": (all(v["met"] for v in per.values()) if per else None), "per_preset": per}
    students = [r for r in dec if r["variant"] not in ("dense",) and not is_sparse(r["variant"])
                and "compile" not in r["variant"]]
    out["decode_not_slower"] = {
        "goal": "every dense-kernel student >= 1.0x dense static-cache decode tok/s at every decode batch",
        "met": all(r["speedup"] >= 1.0 for r in students) if students else None,
        "slower": [{"shape": _shape(r), "variant": r["variant"], "speedup": r["speedup"]} for r in students
                   if r["speedup"] < 1.0],
    }
    return out


# ---------------------------------------------------------------------------------------------
# output


def _print_row(r: dict) -> None:
    shape = f"b{r['batch']} t{r['seq_len']}" if r["phase"] == "prefill" else f"b{r['batch']} ctx{r['context']}"
    if "error" in r:
        print(f"  {r['preset']:>5} {r['variant']:>19} {r['phase']:>13} {r['mode']:>5} {shape:>12}  ERROR {r['error']}",
              flush=True)
    else:
        print(f"  {r['preset']:>5} {r['variant']:>19} {r['phase']:>13} {r['mode']:>5} {shape:>12} "
              f"{r['latency_ms']:>10.3f} ms {r['tokens_per_s']:>14,.0f} tok/s", flush=True)


def print_table(rows: list[dict], linear_rows: list[dict], goal: dict[str, Any]) -> None:
    print(f"\n{'preset':>6} {'variant':>19} {'phase':>13} {'mode':>5} {'shape':>12} {'ms':>10} {'tokens/s':>14} "
          f"{'speed-up':>8} {'2:4 wins':>8}")
    order = {v: i for i, v in enumerate(VARIANTS)}
    presets = {p: i for i, p in enumerate(dict.fromkeys(r["preset"] for r in rows))}
    for r in sorted(rows, key=lambda r: (presets[r["preset"]], r["phase"] != "prefill", r["batch"], r["seq_len"], r["context"],
                                         r["mode"] != "eager", order[r["variant"]])):
        shape = f"b{r['batch']} t{r['seq_len']}" if r["phase"] == "prefill" else f"b{r['batch']} ctx{r['context']}"
        head = f"{r['preset']:>6} {r['variant']:>19} {r['phase']:>13} {r['mode']:>5} {shape:>12}"
        if "error" in r:
            print(f"{head} ERROR {r['error']}")
            continue
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        w = ("yes" if r["wins"] else "LOSES") if "wins" in r else ""
        ttft = f"  TTFT {r['ttft_ms']:.3f} ms" if "ttft_ms" in r else ""
        match = "  TOKENS DIFFER FROM EAGER" if r.get("tokens_match_eager") is False else ""
        print(f"{head} {r['latency_ms']:>10.3f} {r['tokens_per_s']:>14,.0f} {sp:>8} {w:>8}{ttft}{match}")
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
    print("\nissue 18's goals (ratios against dense in this run):")
    for key in ("model_24", "structured_prefill_18", "structured_decode", "decode_not_slower"):
        g = goal.get(key)
        if g is None:
            continue
        detail = ""
        if key == "model_24":
            detail = "; ".join(f"{p}: best {v['best_variant']} {v['speedup']:.2f}x (target {v['target']}x; "
                               + ", ".join(f"{n} {x:.2f}x" for n, x in v["all"].items()) + ")"
                               for p, v in g["per_preset"].items())
        elif key == "structured_prefill_18":
            detail = "; ".join(f"{p}: {v['speedup']:.2f}x" for p, v in g["per_preset"].items())
        elif key == "structured_decode":
            detail = "; ".join(f"{p}: " + ", ".join(f"b{b} {x:.2f}x" for b, x in v["per_batch"].items())
                               for p, v in g["per_preset"].items())
        elif g["slower"]:
            detail = "slower: " + ", ".join(f"{x['variant']} {x['shape']} {x['speedup']:.2f}x" for x in g["slower"])
        print(f"  {g['goal']}: {verdict[g['met']]}" + (f" ({detail})" if detail else ""))


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for p in ("transformers", "torch-pruning"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def write_result(path: Path, args: argparse.Namespace, measured: list[str], variants: list[dict], rows: list[dict],
                 linear_rows: list[dict], goal: dict | None, complete: bool, t0: float,
                 profiles: list[dict] | None = None, skipped: list[str] | None = None) -> None:
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
        "linear_shapes": linear_rows, "goals": goal, "profiles": profiles or [], "skipped": skipped or [],
    })


# ---------------------------------------------------------------------------------------------


def _fused_shapes(model) -> list[tuple[int, int]]:
    """The weight shapes of the fused matmuls of the first block (LLaMA: q/k/v and gate/up; the architecture's
    ``fusable`` groups in :mod:`pipeline.architectures`), for the per-shape bench; ``[]`` for an architecture
    with none."""
    from pipeline import architectures

    arch = architectures.find(model)
    if arch is None:
        return []
    block = arch.blocks_of(model)[1][0]
    shapes = []
    for _, group in arch.fusable:
        ws = [block.get_submodule(p).weight for p in group]
        shapes.append((sum(w.shape[0] for w in ws), ws[0].shape[1]))
    return shapes


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    variants = [v for v in VARIANTS if v in args.variants]
    if args.device != "cuda" and any(is_sparse(v) for v in variants):
        print("2:4 is measured on CUDA only (torch.sparse.to_sparse_semi_structured has no CPU kernel): "
              f"measuring {', '.join(v for v in variants if not is_sparse(v))}", flush=True)
        variants = [v for v in variants if not is_sparse(v)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) / f"sparse-{stamp}.json"
    ppath = Path(args.out) / f"profile-{stamp}.txt"
    infos: list[dict] = []
    rows: list[dict] = []
    linear_rows: list[dict] = []
    profiles: list[dict] = []
    skipped: list[str] = []

    def over_budget(what: str) -> bool:
        if args.time_budget and time.time() - t0 > args.time_budget:
            skipped.append(what)
            print(f"time budget of {args.time_budget:.0f} s spent: skipping {what}", flush=True)
            return True
        return False

    def save(goal: dict | None = None, complete: bool = False) -> None:
        add_speedups(rows)
        write_result(path, args, variants, infos, rows, linear_rows, goal, complete, t0, profiles, skipped)
        if profiles:
            try:
                ppath.write_text(profile_text(profiles, linear_rows))
            except Exception as e:  # noqa: BLE001 - the JSON holds the profiles anyway
                print(f"profile text not written: {_error(e)}", flush=True)

    for preset in args.presets:
        if over_budget(f"preset {preset}"):
            continue
        tp = time.time()
        base, vocab = build_dense(preset, args)
        print(f"{preset}: built in {time.time() - tp:.1f} s ({_n_params(base)[0]:,} parameters)", flush=True)
        models: dict[str, Any] = {}  # every variant stays until the preset is done: decode is interleaved
        for name in variants:
            if over_budget(f"{preset} {name}"):
                continue
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
                if args.dynamic_decode:
                    rows += measure_decode(model, vocab, args, common)
                info["measure_s"] = time.time() - tv
                models[name] = model
            del model
            _free(args.device)
            save()
        dec_models = {n: m for n, m in models.items() if n in args.decode_variants}
        if args.static_decode and "dense" in dec_models and not over_budget(f"{preset} static decode"):
            td = time.time()
            try:
                rows += measure_static_decode(dec_models, vocab, args, preset)
            except Exception as e:  # noqa: BLE001
                rows.append({"preset": preset, "variant": "dense", "phase": "decode_static", "mode": "-",
                             "batch": 0, "seq_len": 1, "context": args.prompt_len, "error": _error(e)})
                print(f"{preset} static decode: {rows[-1]['error']}", flush=True)
            print(f"{preset}: static decode in {time.time() - td:.1f} s", flush=True)
            _free(args.device)
            save()
        del dec_models
        if args.profile and preset in args.profile_presets:
            for name in args.profile_variants:
                if name not in models or over_budget(f"{preset} profile {name}"):
                    continue
                tq = time.time()
                try:
                    pr = profile_prefill(models[name], vocab, args)
                except Exception as e:  # noqa: BLE001
                    pr = {"error": _error(e)}
                profiles.append({"preset": preset, "variant": name, "phase": "prefill", **pr})
                print(f"{preset} {name}: profiled in {time.time() - tq:.1f} s"
                      + (f" (error {pr['error']})" if "error" in pr else ""), flush=True)
                _free(args.device)
                save()
            if args.static_decode:
                for name in ("dense", "structured"):
                    if name not in models or over_budget(f"{preset} decode profile {name}"):
                        continue
                    try:
                        pr = profile_decode(models[name], vocab, args, max(args.decode_batch_sizes))
                    except Exception as e:  # noqa: BLE001
                        pr = {"error": _error(e)}
                    profiles.append({"preset": preset, "variant": name, "phase": "decode", **pr})
                    _free(args.device)
                    save()
        models.clear()
        _MASKED.clear()
        _free(args.device)
        if args.device == "cuda" and any(is_sparse(v) for v in variants) and not over_budget(f"{preset} linear shapes"):
            shapes = sorted({tuple(m.weight.shape) for m in prunable_linears(base).values()}
                            | (set(_fused_shapes(base)) if any("fuse" in v for v in variants) else set()))
            tokens = sorted(set(args.linear_tokens) | {args.goal_shape[0] * args.goal_shape[1]})
            try:
                lr = linear_shape_bench(shapes, tokens, DTYPES[args.dtype], args.warmup, args.repeats, args.seed)
            except Exception as e:  # noqa: BLE001
                lr = [{"out": o, "in": i, "tokens": 0, "error": _error(e)} for o, i in shapes]
            linear_rows += [{"preset": preset, **r} for r in lr]
            _free(args.device)
        del base
        _free(args.device)
        save()
        print(f"{preset}: done in {time.time() - tp:.1f} s (partial results in {path})", flush=True)
    add_speedups(rows)
    try:
        goal = goals(rows, args.device, variants, tuple(args.goal_shape))
    except Exception as e:  # noqa: BLE001 - the rows are written whatever happens to the bookkeeping
        goal = {"error": _error(e)}
    save(goal, complete=True)
    try:
        print_table(rows, linear_rows, goal)
        if profiles:
            print("\n" + profile_text(profiles, linear_rows))
            print(f"-> {ppath}")
    except Exception as e:  # noqa: BLE001
        print(f"table not printed: {_error(e)}", flush=True)
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    main()
