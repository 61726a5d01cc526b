"""Perplexity right after pruning, with no recovery: magnitude against activation-aware importance, on one
run's dense stage-02 model and its validation split.

    python scripts/bench_prune.py --run NAME [--results_dir results] [--calib_blocks 128] [--eval_tokens 0]
        [--variants unstructured,2:4,structured] [--wanda_orders sequential,one_pass] [--device auto]
        [--out results/bench]

For every variant the dense model is reloaded from ``results/<run>/02_pretrain`` and pruned in memory with
:func:`pipeline.prune.prune_model` (nothing is written under the run):

- ``unstructured``: 50% per layer, ``magnitude`` against ``wanda`` (sequential and one-pass);
- ``2:4``: ``magnitude`` against ``wanda`` (sequential and one-pass);
- ``structured``: 50% of the key/value groups and MLP channels, group ``magnitude`` against ``activation``;
- ``depth``: (only when named in ``--variants``) ``--drop_layers`` blocks of lowest Block Influence, alone.

Calibration blocks come from the training split (:func:`pipeline.calibration.calibration_blocks`, seeded by
``--seed``), the perplexity from the whole validation split (or its first ``--eval_tokens``), the same for every
variant.  The goal of issue 16 is printed for each pair: activation-aware importance at least halves magnitude's
perplexity increase (unstructured, 2:4) or cuts it by at least 30% (structured); increase = ppl − dense ppl.

Output: a table on stdout and ``<out>/prune-<YYYYmmdd-HHMMSS>.json`` (time, git commit, device, the dense model's
data regime read from the stage-02 manifest when it records one, the arguments, ``rows``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

VARIANTS = {
    "unstructured": [("magnitude", {"method": "magnitude"}),
                     ("wanda", {"method": "magnitude", "importance": "wanda"}),
                     ("wanda one_pass", {"method": "magnitude", "importance": "wanda", "calib_order": "one_pass"})],
    "2:4": [("magnitude", {"method": "nm"}),
            ("wanda", {"method": "nm", "importance": "wanda"}),
            ("wanda one_pass", {"method": "nm", "importance": "wanda", "calib_order": "one_pass"})],
    "structured": [("magnitude", {"method": "structured"}),
                   ("activation", {"method": "structured", "importance": "activation"})],
    "depth": [("block influence", {"method": "structured", "sparsity": 0.0})],
}
#: the goal per variant: the share of magnitude's perplexity increase that activation-aware importance must remove
GOALS = {"unstructured": 0.5, "2:4": 0.5, "structured": 0.3}


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    except OSError:
        return "?"


def _prune_script():
    """scripts/prune.py as a module (its ``load_pretrained`` loads the stage-02 model as stage 03 does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_prune_stage", Path(__file__).resolve().parent / "prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--results_dir", default="results")
    ap.add_argument("--variants", default="unstructured,2:4,structured")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib_blocks", type=int, default=128)
    ap.add_argument("--drop_layers", type=int, default=1)
    ap.add_argument("--eval_tokens", type=int, default=0)
    ap.add_argument("--eval_batch_size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--wanda_orders", default="sequential,one_pass",
                    help="calibration orders of wanda measured (sequential, one_pass, or both)")
    ap.add_argument("--out", default="results/bench")
    args = ap.parse_args(argv)

    from pipeline.calibration import calibration_blocks
    from pipeline.evaluate import validation_loss
    from pipeline.manifest import require_stage
    from pipeline.prune import PruneConfig, prune_model
    from pipeline.tokens import load_tokens

    load_pretrained = _prune_script().load_pretrained

    run_dir = Path(args.results_dir) / args.run
    pre = require_stage(run_dir, "pretrain", args.run)
    data = require_stage(run_dir, "data", args.run)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    seq_len = int(data["outputs"]["seq_len"])
    val = load_tokens(data["_dir"], "val", data)
    if args.eval_tokens:
        val = val[: args.eval_tokens]
    calib = calibration_blocks(data["_dir"], data, args.calib_blocks, seq_len, args.seed)
    dense, _, _ = load_pretrained(pre, device)
    dense_loss, dense_ppl = validation_loss(dense, val, seq_len, args.eval_batch_size)
    print(f"dense val/ppl {dense_ppl:.3f} ({(len(val) - 1) // seq_len * seq_len} validation tokens, "
          f"{calib.numel()} calibration tokens of the training split)", flush=True)
    rows = [{"variant": "dense", "importance": "-", "val_loss": dense_loss, "val_ppl": dense_ppl, "sparsity": 0.0}]
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        for label, kw in VARIANTS[variant]:
            if kw.get("importance") == "wanda" and kw.get("calib_order", "sequential") not in args.wanda_orders.split(","):
                continue
            kw = {"sparsity": args.sparsity, **kw}
            if variant == "depth":
                kw["drop_layers"] = args.drop_layers
            cfg = PruneConfig(calib_blocks=args.calib_blocks, eval_batch_size=args.eval_batch_size, seed=args.seed,
                              **kw)
            problems = cfg.validate()
            if problems:
                raise SystemExit("; ".join(problems))
            model, _, _ = load_pretrained(pre, device)
            t0 = time.perf_counter()
            res = prune_model(model, cfg, calib if cfg.needs_calibration() else None)
            prune_s = time.perf_counter() - t0
            loss, ppl = validation_loss(model, val, seq_len, args.eval_batch_size)
            row = {"variant": variant, "importance": label, "val_loss": loss, "val_ppl": ppl,
                   "sparsity": res["sparsity"], "prune_s": prune_s, "increase": ppl - dense_ppl,
                   "depth": res.get("depth"), "config": {k: v for k, v in kw.items()}}
            rows.append(row)
            print(f"{variant:>12} {label:>16}: val/ppl {ppl:9.3f} (+{ppl - dense_ppl:.3f}), sparsity "
                  f"{res['sparsity']:.4f}, pruning {prune_s:.1f} s", flush=True)
            del model
    goals = []
    for variant, share in GOALS.items():
        base = [r for r in rows if r["variant"] == variant and r["importance"] == "magnitude"]
        for r in rows:
            if r["variant"] == variant and r["importance"] != "magnitude" and base:
                cut = 1.0 - r["increase"] / base[0]["increase"] if base[0]["increase"] > 0 else float("nan")
                goals.append({"variant": variant, "importance": r["importance"], "increase_cut": cut,
                              "goal": share, "met": bool(cut >= share)})
                print(f"goal {variant} {r['importance']}: cuts magnitude's increase by {cut:.1%} "
                      f"(goal {share:.0%}): {'met' if cut >= share else 'NOT met'}")
    out = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit(), "device": device,
           "torch": torch.__version__, "run": str(run_dir), "data_regime": pre.get("metrics", {}).get("data_regime"),
           "pretrain_steps": pre.get("metrics", {}).get("steps"), "train_tokens": data["metrics"].get("train_tokens"),
           "tokens_seen": pre.get("metrics", {}).get("tokens_seen"), "args": vars(args), "rows": rows,
           "goals": goals}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"prune-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"-> {path}")
    return out


if __name__ == "__main__":
    main()
