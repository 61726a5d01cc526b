"""The run report: ``results/<run>/report.md`` and ``results/<run>/plots/*.png``.

Built only from what the stages wrote -- their ``manifest.json`` files and ``metrics.jsonl`` logs --
never by measuring anything again (stages never write report fragments either; nanochat's rule).
Stage 05 is required (it holds the per-model table); every other stage is optional and a missing one
is named in the report.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CommonConfig
from pipeline.manifest import MANIFEST, STAGE_DIRS, read_manifest, require_stage, stage_dir
from pipeline.metrics import read_metrics

PLOTS = "plots"


@dataclass
class ReportConfig(CommonConfig):
    """Configuration of the report (which run, where results live); nothing else is chosen here."""

    def validate(self) -> list[str]:
        """Every problem of the configuration (none can arise beyond the common fields)."""
        return [] if self.run else ["run: must not be empty"]


# ---------------------------------------------------------------------------------------------
# reading


def collect(run_dir: str | Path) -> dict[str, Any]:
    """The manifests and metric logs of a run.

    Returns ``{"manifests": {stage: manifest}, "metrics": {stage: [rows]}}`` for every stage whose
    directory holds a manifest; ``eval`` is always present.

    Raises:
        StageError: when ``05_eval`` is missing or incomplete (the message names ``make eval``).
    """
    run_dir = Path(run_dir)
    manifests = {"eval": require_stage(run_dir, "eval")}
    for stage in STAGE_DIRS:
        m = stage_dir(run_dir, stage) / MANIFEST
        if stage != "eval" and m.exists():
            manifests[stage] = read_manifest(m)
            manifests[stage]["_dir"] = str(m.parent)
    metrics = {}
    for stage, man in manifests.items():
        rows = read_metrics(Path(man["_dir"]) / man.get("outputs", {}).get("metrics", "metrics.jsonl"))
        if rows:
            metrics[stage] = rows
    order = list(STAGE_DIRS)
    return {"manifests": dict(sorted(manifests.items(), key=lambda kv: order.index(kv[0]))), "metrics": metrics}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows of a metrics log that hold ``key`` (non-finite values kept as nan)."""
    steps, vals = [], []
    for r in rows:
        if key in r:
            try:
                v = float(r[key])
            except (TypeError, ValueError):
                continue
            steps.append(int(r["step"]))
            vals.append(v)
    return steps, vals


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend: no display needed)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: the loss panels: (stage, title, left-axis keys, right-axis keys on a log scale); the training loss
#: of distillation is ``kd/loss`` (logged again as ``train/loss``), so only the cross-entropy panel compares
#: training with validation, and the KD objective and its KL term get their own panel and axes
LOSS_PANELS = (
    ("pretrain", "pretrain: cross-entropy (nats/token)", ("train/loss", "val/loss"), ()),
    ("distill", "distill: cross-entropy on labels (nats/token)", ("kd/ce", "val/loss"), ()),
    ("distill", "distill: KD objective (left) and KL term (right, log)", ("kd/loss",), ("kd/kl",)),
)


def loss_panels(metrics: dict[str, list[dict]]) -> list[tuple[str, str, tuple, tuple]]:
    """The :data:`LOSS_PANELS` that have data, each with only the keys that were logged; a distillation
    ``train/loss`` is never drawn (it is ``kd/loss`` again, and would hide it)."""
    out = []
    for stage, title, left, right in LOSS_PANELS:
        rows = metrics.get(stage, [])
        left = tuple(k for k in left if series(rows, k)[0])
        right = tuple(k for k in right if series(rows, k)[0])
        if left or right:
            out.append((stage, title, left, right))
    return out


def plot_losses(metrics: dict[str, list[dict]], path: Path) -> Path | None:
    """Pretraining (``train/loss``, ``val/loss``) and distillation curves over optimizer steps, one panel per
    quantity (:func:`loss_panels`): distillation's ``kd/ce`` against ``val/loss`` (both cross-entropy on
    labels), and ``kd/loss`` with ``kd/kl`` on its own log axis; ``None`` (no file) when nothing was logged."""
    panels = loss_panels(metrics)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (stage, title, left, right) in zip(axes[0], panels):
        handles = []
        for key in left:
            x, y = series(metrics[stage], key)
            handles += ax.plot(x, y, marker="o" if key.startswith("val/") else None, label=key)
        ax.set(title=title, xlabel="step", ylabel=" / ".join(left) or "loss")
        ax.grid(alpha=0.3)
        if right:
            ax2 = ax.twinx()
            for key in right:
                x, y = series(metrics[stage], key)
                handles += ax2.plot(x, y, color="tab:red", linestyle="--", label=key)
            if all(v > 0 for key in right for v in series(metrics[stage], key)[1]):
                ax2.set_yscale("log")
            ax2.set_ylabel(" / ".join(right))
        ax.legend(handles=handles, labels=[h.get_label() for h in handles])
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (100 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_scale(metrics: dict[str, list[dict]], path: Path, precisions: dict[str, Any] | None = None) -> Path | None:
    """fp16 dynamic loss scale (``train/loss_scale``) over steps for pretraining and distillation, log2
    axis, each line labelled with its stage's ``precisions`` entry (a flat line at 1 is a bf16/fp32 run,
    which scales nothing); ``None`` when no stage logged one."""
    precisions = precisions or {}
    lines = {s: series(metrics.get(s, []), "train/loss_scale") for s in ("pretrain", "distill")}
    lines = {s: xy for s, xy in lines.items() if xy[0]}
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, (x, y) in lines.items():
        ax.step(x, y, where="post", label=f"{stage} ({precisions.get(stage) or 'precision ?'})")
    ax.set_yscale("log", base=2)
    flat = all(set(y) == {1.0} for _, y in lines.values())
    ax.set(title="dynamic loss scale" + (" (constant 1: no fp16 stage, nothing was scaled)" if flat else ""),
           xlabel="step", ylabel="loss scale")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def quality_axes(models: dict[str, dict]) -> list[tuple[str, str, float]]:
    """The x axes of :func:`plot_quality_vs_size` as ``(result key, label, scale)``: sparsity of the linear
    weights and non-zero parameters; when no model has a zero weight (width-pruned runs: the model is smaller,
    not sparse) the sparsity axis would put every point at 0, so it becomes the size on disk (MB)."""
    first = (("linear_sparsity", "sparsity of linear weights", 1.0)
             if any(r.get("linear_sparsity", 0) > 0 for r in models.values())
             else ("size_bytes", "size on disk (MB, safetensors)", 1e-6))
    return [first, ("nonzero", "non-zero parameters", 1.0)]


def plot_quality_vs_size(models: dict[str, dict], path: Path) -> Path:
    """Validation perplexity against sparsity of the prunable linear weights (or size on disk, see
    :func:`quality_axes`) and against non-zero parameters, one labelled point per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    from matplotlib.ticker import ScalarFormatter

    markers = "osD^vP*Xph<>"
    ppls = [r["val_ppl"] for r in models.values()]
    log_y = max(ppls) > 2 * min(ppls)
    for ax, (key, label, scale) in zip(axes, quality_axes(models)):
        # one marker per model, named in the legend with its perplexity: text labels beside the points overlap
        # where models share a size (the student and its controls), and a far-off control squeezes the rest
        for i, (name, row) in enumerate(models.items()):
            ax.scatter(row[key] * scale, row["val_ppl"], s=50, marker=markers[i % len(markers)], alpha=0.8,
                       label=f"{name} ({row['val_ppl']:.2f})")
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis, not 1.2 × 10^2
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set(xlabel=label, ylabel="validation perplexity" + (" (log)" if log_y else ""),
               title=f"perplexity vs {label}")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------
# formatting


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:,.{digits}f}"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _int(x: Any) -> str:
    return "–" if x is None else f"{int(x):,}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def graphed_reference(models: dict[str, dict], ref: str) -> bool:
    """True when every model has a CUDA-graph latency at ``ref``: the main table then uses it, since eager
    latency of a small model on a GPU is mostly host launch time and varies by tens of percent between calls."""
    return bool(models) and all("latency_graph_ms" in r["latency"].get(ref, {}) for r in models.values())


def model_table(models: dict[str, dict], ref: str) -> list[str]:
    """The main table: one row per model, latency and speed-up at the reference shape ``ref``
    (``b<batch>_t<seq>``); CUDA-graph latency where every model has one (:func:`graphed_reference`)."""
    rows = []
    graphed = graphed_reference(models, ref)
    dkeys = decode_keys(models)
    for name, r in models.items():
        lat = dict(r["latency"].get(ref, {}))
        if graphed:
            lat["latency_ms"], lat["speedup"] = lat["latency_graph_ms"], lat.get("speedup_graph")
        rows.append([
            f"**{name}**", f"{r['stage_dir']}" + (f" ({r['method']})" if r.get("method") else ""),
            _f(r["val_ppl"]), _pct(r.get("rel_ppl")), _int(r["params"]), _int(r["nonzero"]), _pct(r.get("rel_nonzero")),
            f"{100 * r['linear_sparsity']:.1f}% / {100 * r['sparsity']:.1f}%",
            _f(r["size_bytes"] / 1e6), _f(r["sparse_size_bytes"] / 1e6),
            _f(lat.get("latency_ms")) + ("" if graphed else flag_mark(lat.get("flags"))),
            _f(lat.get("speedup")) + "×" + ("" if graphed else flag_mark(lat.get("flags"))),
            _f(r["gen_tokens_per_s"], 1) + flag_mark(r.get("gen_flags")),
            *decode_cells(r, dkeys),
        ])
    return _table(["model", "stage", "val ppl", "Δ ppl vs dense", "params", "non-zero", "Δ non-zero",
                   "sparsity linear weights / all parameters", "size MB (safetensors)", "size MB (bitmask+values)",
                   f"latency ms ({ref}{', CUDA graph' if graphed else ''})", "speed-up",
                   "generate tok/s (HF eager, b1)", *decode_header(models, dkeys)], rows)


_DECODE_PATHS = {"graph": "static KV cache, CUDA graph", "compile": "static KV cache, torch.compile",
                 "eager": "static KV cache, eager"}


def decode_keys(models: dict[str, dict]) -> list[str]:
    """The decode batch keys (``b<batch>``) that the dense model measured, smallest batch first."""
    rows = (models.get("dense") or {}).get("decode") or {}
    return sorted((k for k, v in rows.items() if v.get("tok_s")), key=lambda k: int(k[1:]))


def decode_paths(models: dict[str, dict]) -> str:
    """The decode paths that produced the figures, in words (``a, b`` when models differ)."""
    paths = {d.get("path") for r in models.values() for d in (r.get("decode") or {}).values() if d.get("path")}
    return ", ".join(_DECODE_PATHS.get(p, p) for p in sorted(paths)) or "not measured"


def decode_header(models: dict[str, dict], keys: list[str]) -> list[str]:
    if not keys:
        return []
    b = " / ".join(keys)
    return [f"decode tok/s ({b}; {decode_paths(models)})", f"decode speed-up ({b})"]


def decode_cells(r: dict[str, Any], keys: list[str]) -> list[str]:
    """Decode tok/s and speed-up against dense per batch key, ``a / b`` (``–`` where not measured)."""
    if not keys:
        return []
    rows = r.get("decode") or {}
    return [" / ".join(_f(rows.get(k, {}).get("tok_s"), 0) + flag_mark(rows.get(k, {}).get("flags")) for k in keys),
            " / ".join(_f(rows.get(k, {}).get("speedup_tok_s")) + "×" + flag_mark(rows.get(k, {}).get("flags"))
                       for k in keys)]


def decode_table(models: dict[str, dict]) -> list[str]:
    """Per model and decode batch size: path, time to first token, ms per token, tok/s and speed-ups."""
    rows = []
    for name, r in models.items():
        for key, d in (r.get("decode") or {}).items():
            if "error" in d:
                rows.append([name, key[1:], "–", "–", "–", "–", "–", "–", f"error: {d['error']}"])
                continue
            note = f"fell back: {d['fallback']}" if d.get("fallback") else ""
            if d.get("tokens_match_eager") is False:
                note += " tokens differ from the eager path"
            rows.append([name, key[1:], _DECODE_PATHS.get(d.get("path"), str(d.get("path"))),
                         f"{d.get('prompt_len')} + {d.get('new_tokens')}", _f(d.get("ttft_ms"), 2),
                         _f(d.get("ms_per_token"), 3), _f(d.get("tok_s"), 0) + flag_mark(d.get("flags")),
                         _f(d.get("speedup_tok_s")) + "× / " + _f(d.get("speedup_ttft")) + "×", note])
    if not rows:
        return ["Decoding was not measured in this run (`--decode false`)."]
    return _table(["model", "batch", "path", "prompt + new tokens", "TTFT ms (prefill)", "ms / token",
                   "tok/s (batch)", "speed-up tok/s / TTFT", "note"], rows) + [
        "", "Greedy decoding as a server runs it (`pipeline/decode.py`): the KV cache is allocated once "
        "(transformers' `StaticCache`); TTFT is the eager prefill of the prompt with its first token; each further "
        "token is one decode step, replayed from a CUDA graph on CUDA. Models are timed in interleaved rounds. "
        "The `generate tok/s` column of the main table is Hugging Face's eager `generate` (host-bound on a GPU)."]


def noisy(lat: dict[str, Any]) -> bool:
    """True when a latency measurement is not trustworthy: flagged by stage 05's CPU timing protocol
    (``flags``, :func:`pipeline.timing.timing_flags`), or, in runs made before it, when the slowest repeat took
    over twice the fastest (a busy machine)."""
    if "flags" in lat:
        return bool(lat["flags"])
    return "latency_min_ms" in lat and lat["latency_max_ms"] > 2 * lat["latency_min_ms"]


#: what each timing flag means, for the table's footnote
FLAG_TEXT = {"spread": "its repeats span more than {max_spread:.0%} of their median",
             "ratio": "its per-round ratio to dense (the speed-up) varies by more than {max_spread:.0%}"}


def flag_mark(flags: list[str] | None) -> str:
    """`` ⚠ spread, ratio`` after a figure that stage 05 flagged (empty when not flagged)."""
    return f" ⚠ {', '.join(flags)}" if flags else ""


def generation_table(models: dict[str, dict]) -> list[str]:
    """Greedy generation tokens/s per model, median (slowest–fastest repeat), with the timing flags; empty
    for runs made before stage 05 recorded the spread."""
    if not all("gen_tokens_per_s_min" in r for r in models.values()):
        return []
    rows = [[name, f"{_f(r['gen_tokens_per_s'], 1)} ({_f(r['gen_tokens_per_s_min'], 1)}–"
                   f"{_f(r['gen_tokens_per_s_max'], 1)})" + flag_mark(r.get("gen_flags")),
             _f(r.get("gen_speedup")) + "×"] for name, r in models.items()]
    return _table(["model", "generate tok/s median (min–max)", "vs dense"], rows)


def latency_table(models: dict[str, dict]) -> list[str]:
    """Forward latency and speed-up against dense for every measured shape (eager, and CUDA-graphed
    where measured)."""
    graphed = any("latency_graph_ms" in lat for r in models.values() for lat in r["latency"].values())
    rows = []
    for name, r in models.items():
        for lat in r["latency"].values():
            spread = (f" ({_f(lat['latency_min_ms'], 3)}–{_f(lat['latency_max_ms'], 3)})"
                      if "latency_min_ms" in lat else "")
            spread += (flag_mark(lat["flags"]) if "flags" in lat else " ⚠ noisy") if noisy(lat) else ""
            row = [name, str(lat["batch"]), str(lat["seq_len"]), _f(lat["latency_ms"], 3) + spread,
                   _f(lat["tokens_per_s"], 0),
                   _f(lat.get("speedup")) + "×"]
            if graphed:
                row += [_f(lat.get("latency_graph_ms"), 3), _f(lat.get("speedup_graph")) + "×"]
            rows.append(row)
    header = ["model", "batch", "seq len", "latency ms median (min–max)", "tokens/s", "speed-up vs dense"]
    if graphed:
        header += ["latency ms (CUDA graph)", "speed-up (CUDA graph)"]
    return _table(header, rows)


def sparse_24_section(models: dict[str, dict], device: str) -> list[str]:
    """2:4 semi-structured results: per model shape speed-ups against the same model dense, and the
    per-linear-shape benchmark with every shape where 2:4 loses marked."""
    measured = {n: r["sparse_24"] for n, r in models.items() if r.get("sparse_24")}
    if not measured:
        if device != "cuda":
            return ["2:4 semi-structured kernels (`torch.sparse.to_sparse_semi_structured`) need CUDA; this run "
                    f"was evaluated on {device}, so they were not measured."]
        return ["No model of this run follows the 2:4 pattern (prune with `--method nm`), so no 2:4 kernel was timed."]
    out = []
    for name, sp in measured.items():
        out += [f"**{name}**: {len(sp['converted'])} linear layers converted, {len(sp['skipped'])} left dense"
                + (f" ({'; '.join(f'{k}: {v}' for k, v in list(sp['skipped'].items())[:4])})" if sp["skipped"] else "")
                + (f"; max |logit difference| sparse vs dense {sp['max_abs_logit_diff']:.3g}"
                   if "max_abs_logit_diff" in sp else "")
                + (f"; conversion (`to_semi_structured`): {', '.join(f'{k}={v}' for k, v in sp['options'].items())}"
                   if sp.get("options") else ""), ""]
        if "latency" in sp:
            rows = [[str(lat["batch"]), str(lat["seq_len"]), _f(lat.get("dense_latency_ms"), 3), _f(lat["latency_ms"], 3),
                     _f(lat.get("speedup")) + "×", _f(lat.get("dense_latency_graph_ms"), 3),
                     _f(lat.get("latency_graph_ms"), 3), _f(lat.get("speedup_graph")) + "×"]
                    for lat in sp["latency"].values()]
            out += _table(["batch", "seq len", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)",
                           "2:4 ms (graph)", "speed-up (graph)"], rows)
            out += ["", f"Generation at batch 1 with 2:4 weights (eager): {_f(sp.get('gen_tokens_per_s'), 1)} tok/s.", ""]
        if sp.get("linear_shapes"):
            rows = []
            for s in sp["linear_shapes"]:
                if "error" in s:
                    rows.append([f"{s['out']}×{s['in']}", str(s["tokens"]), "–", "–", "–", f"refused: {s['error']}"])
                    continue
                g = s["speedup_graph"]
                verdict = "2:4 wins" if g >= 1.05 else "**2:4 loses**" if g <= 0.95 else "even (±5%)"
                rows.append([f"{s['out']}×{s['in']}", str(s["tokens"]), _f(s["speedup"]) + "×",
                             _f(s["dense_graph_ms"], 4), _f(s["sparse_graph_ms"], 4), f"{_f(s['speedup_graph'])}× {verdict}"])
            out += ["Per linear-layer shape (weight out×in, tokens = batch × seq len), dense against 2:4 fp16:", ""]
            out += _table(["weight", "tokens", "speed-up eager", "dense ms (graph)", "2:4 ms (graph)",
                           "speed-up (graph)"], rows)
            out += [""]
    out += ["Eager 2:4 pays a fixed host cost per sparse matmul (cuSPARSELt set-up); inside a CUDA graph it "
            "disappears, so the graphed figures are the kernel's own speed."]
    return out


def student_tail(models: dict[str, dict], s: dict, d: dict) -> str:
    """The end of the summary's sentence on the distilled student: the models trained without compression that
    beat it, or that there are none (or no controls at all); never a share of the pruning loss "recovered"."""
    beaten_by = [n for n, r in models.items() if r.get("stage") == "controls" and r["val_ppl"] < s["val_ppl"]]
    below_dense = "; it is below the dense model's too, having trained more steps than the teacher" \
        if s["val_ppl"] < d["val_ppl"] else ""
    if beaten_by:
        return (below_dense + "; but " + ", ".join(f"{label(n)} ({_f(models[n]['val_ppl'])})" for n in beaten_by)
                + (" is" if len(beaten_by) == 1 else " are") + " lower still, without pruning or without the teacher "
                "(see the headline).")
    if any(r.get("stage") == "controls" for r in models.values()):
        return below_dense + "; no control model beats it (see the headline)."
    return below_dense + "; this run has no control models (`make controls`) to say what else the same steps buy."


def recipe_line(mans: dict[str, dict]) -> str | None:
    """The compression recipe as stages 03 and 04 recorded it (pruning method, sparsity, importance and
    calibration; distillation steps, LR, ``alpha``, temperature and hidden-state weight), or ``None`` when the run
    has neither stage.  Named in the report so a figure can be traced to the settings that produced it."""
    parts = []
    pc = (mans.get("prune") or {}).get("config") or {}
    if pc:
        imp = pc.get("importance") or "magnitude"
        calib = f", {pc.get('calib_blocks')} calibration blocks of the training split" if imp != "magnitude" else ""
        depth = f", {pc['drop_layers']} blocks dropped" if pc.get("drop_layers") else ""
        parts.append(f"pruning {pc.get('method')} at sparsity {pc.get('sparsity')} by {imp} importance{calib}{depth}")
    dc = (mans.get("distill") or {}).get("config") or {}
    if dc:
        hidden = f", hidden-state MSE weight {dc['hidden_mse_weight']}" if dc.get("hidden_mse_weight") else ""
        parts.append(f"distillation {dc.get('max_steps')} steps at LR {dc.get('lr')} (warm-up {dc.get('warmup_steps')}),"
                     f" alpha {dc.get('alpha')} (KL weight), temperature {dc.get('temperature')}{hidden}")
    return ("- Recipe: " + "; ".join(parts) + ".") if parts else None


def summary_lines(models: dict[str, dict]) -> list[str]:
    """Plain-language findings computed from the table's figures (no new measurement)."""
    d = models["dense"]
    out = [f"- Dense model: perplexity {_f(d['val_ppl'])}, {_int(d['params'])} parameters, "
           f"{_f(d['size_bytes'] / 1e6)} MB on disk."]
    p, s = models.get("pruned"), models.get("distilled")
    if p:
        out.append(f"- Pruning ({p.get('method') or 'unknown method'}) left {_int(p['nonzero'])} non-zero parameters "
                   f"({100 * p['linear_sparsity']:.1f}% of the linear weights zero, {100 * p['sparsity']:.1f}% overall) "
                   f"and moved perplexity to {_f(p['val_ppl'])} ({_pct(p['rel_ppl'])}); size on disk "
                   f"{_f(p['size_bytes'] / 1e6)} MB as dense safetensors, {_f(p['sparse_size_bytes'] / 1e6)} MB as "
                   f"bitmask + values.")
    if s:
        out.append(f"- Distillation: perplexity {_f(s['val_ppl'])} ({_pct(s['rel_ppl'])} vs dense) at "
                   f"{100 * s['linear_sparsity']:.1f}% linear sparsity.")
    if p and s:
        below = s["val_ppl"] < p["val_ppl"]
        # no "distillation recovered N%" here: a recovery says nothing about the controls, which may beat it
        tail = student_tail(models, s, d)
        out.append(f"- Distilled perplexity is {'below' if below else '**not** below'} the pruned one "
                   f"({_f(s['val_ppl'])} vs {_f(p['val_ppl'])})" + tail)
    for name, r in models.items():
        if r.get("mask_violations"):
            out.append(f"- **{name}: {r['mask_violations']} weights are non-zero where the prune masks say pruned.**")
    return out


# ---------------------------------------------------------------------------------------------
# compression against its controls (pipeline.controls) and the data regime (pipeline.regime)

#: what each model is, in the words of the controls table and the headline
ROLE = {"dense": "the dense model (stage 02)", "pruned": "the student right after pruning (stage 03)",
        "distilled": "the pruned student distilled from the dense teacher (stage 04)",
        "dense_plus": "the dense model trained stage 04's steps more",
        "finetune": "the pruned student fine-tuned without the teacher (cross-entropy only)",
        "scratch": "the student's architecture trained from scratch for stage 04's steps",
        "scratch_full": "the student's architecture trained from scratch for stage 02 + 04's steps"}
#: relative perplexity differences below this are reported as equal
SAME_PPL = 0.0005


def label(name: str) -> str:
    """The name a model has in the controls table (``dense_plus`` -> ``dense+``)."""
    from pipeline.controls import LABELS

    return LABELS.get(name, name)


def model_manifests(run_dir: Path, manifests: dict[str, dict], models: dict[str, dict]) -> dict[str, dict]:
    """The manifest of the stage (or control) that made each evaluated model (``{}`` when it is gone)."""
    from pipeline.controls import control_dir

    out = {}
    for name, row in models.items():
        if row.get("stage") == "controls":
            p = control_dir(run_dir, row.get("stage_dir", name)) / MANIFEST
            out[name] = read_manifest(p) if p.is_file() else {}
        else:
            out[name] = manifests.get(row.get("stage"), {})
    return out


def ref_speedup(row: dict, ref: str, graphed: bool) -> float | None:
    """A model's speed-up against dense at the reference shape (CUDA-graph figure when ``graphed``)."""
    lat = row["latency"].get(ref, {})
    return lat.get("speedup_graph") if graphed else lat.get("speedup")


def _rel(a: float, b: float) -> str:
    """``a`` against ``b`` as perplexity (lower is better): '14.6% worse than' / '0.1% better than' / 'as good as'."""
    r = a / b - 1
    if abs(r) < SAME_PPL:
        return "as good as (within 0.05%)"
    return f"{100 * abs(r):.1f}% {'worse' if r > 0 else 'better'} than"


def _steps_of(man: dict) -> int | None:
    m = man.get("metrics", {})
    return m.get("steps", (m.get("budget") or {}).get("steps"))


def controls_table(models: dict[str, dict], mans: dict[str, dict], ref: str, graphed: bool) -> list[str]:
    """Every model with what it cost: its stage's steps and the steps, tokens, tokens per non-zero parameter,
    epochs and device-seconds in all (the teacher's pretraining included where the model descends from it),
    beside its perplexity, the student's perplexity relative to it (``student / model - 1``: positive where the
    student is worse, the figure the headline quotes), and its speed-up against dense."""
    from pipeline.budget import budget_of

    student = models.get("distilled") or models.get("pruned")
    epoch_tokens = None
    for man in mans.values():
        epoch_tokens = epoch_tokens or (man.get("metrics", {}).get("regime") or {}).get("train_tokens")
    units = {(budget_of(m) or {}).get("unit") for m in mans.values() if m} - {None}
    unit = units.pop() if len(units) == 1 else "device-s"
    rows = []
    for name, r in models.items():
        b = budget_of(mans.get(name) or {}) or {}
        cum = b.get("cumulative", {})
        tokens = cum.get("tokens")
        rows.append([
            f"**{label(name)}**", ROLE.get(name, r.get("stage", "?")),
            f"{_int(b.get('steps'))} / {_int(cum.get('steps'))}", _int(tokens),
            _f(tokens / r["nonzero"], 3) if tokens is not None and r.get("nonzero") else "–",
            f"{tokens / epoch_tokens:.3g}" if tokens is not None and epoch_tokens else "–",
            _f(cum.get("device_s"), 0) + (" (est.)" if b.get("estimated") else ""),
            _f(r["val_ppl"]),
            _pct(student["val_ppl"] / r["val_ppl"] - 1) if student else "–",
            _int(r["nonzero"]), _f(ref_speedup(r, ref, graphed)) + "×",
        ])
    return _table(["model", "what it is", "steps (stage / in all)", "tokens in all", "tokens / non-zero param",
                   "epochs in all", f"{unit} in all", "val ppl", "student's ppl vs this", "non-zero params",
                   f"speed-up ({ref})"], rows)


def size_groups(models: dict[str, dict], tol: float = 0.01) -> list[list[str]]:
    """Model names grouped by size: non-zero parameter counts within ``tol`` (relative) of the group's first,
    largest group first."""
    groups: list[list[str]] = []
    for name in sorted(models, key=lambda n: -models[n]["nonzero"]):
        nz = models[name]["nonzero"]
        for g in groups:
            if abs(models[g[0]]["nonzero"] - nz) <= tol * models[g[0]]["nonzero"]:
                g.append(name)
                break
        else:
            groups.append([name])
    return groups


def headline_lines(models: dict[str, dict], mans: dict[str, dict], ref: str, graphed: bool) -> list[str]:
    """The headline, computed from the controls table: which model is best at each size, and what compression
    cost or bought against each control, the student's losses stated as losses."""
    s_name = "distilled" if "distilled" in models else "pruned" if "pruned" in models else None
    controls = [n for n, r in models.items() if r.get("stage") == "controls"]
    out = []
    for g in size_groups(models):
        ranked = sorted(g, key=lambda n: models[n]["val_ppl"])
        best = models[ranked[0]]
        size = f"{_int(best['nonzero'])} non-zero parameters"
        if len(ranked) == 1:
            out.append(f"- At {size} there is one model: **{label(ranked[0])}** (perplexity {_f(best['val_ppl'])}).")
            continue
        rest = ", ".join(f"{label(n)} {_f(models[n]['val_ppl'])} ({_pct(models[n]['val_ppl'] / best['val_ppl'] - 1)})"
                         for n in ranked[1:])
        out.append(f"- At {size} the best model is **{label(ranked[0])}** (perplexity {_f(best['val_ppl'])}); "
                   f"then {rest}.")
    if s_name is None:
        return out
    s = models[s_name]
    who = "The distilled student" if s_name == "distilled" else "The pruned student (no stage 04 in this run)"
    if not controls:
        out.append(f"- {who} has perplexity {_f(s['val_ppl'])}. This run has **no control models** (`make controls`), "
                   f"so nothing here says whether compression beat training a small model directly or the dense "
                   f"one longer.")
        return out
    same_size = next(g for g in size_groups(models) if s_name in g)
    best_small = min(same_size, key=lambda n: models[n]["val_ppl"])
    if best_small == s_name:
        untried = "" if "scratch_full" in controls else (
            " But scratch (whole), the student's architecture trained from scratch for the whole budget, was not "
            "trained in this run, and it is the control most likely to beat the student: this says only that "
            "compression beat the controls that were run.")
        out.append(f"- **Compression paid off at the student's size**: {who.lower()} has the lowest perplexity of "
                   f"the {len(same_size)} models with its {_int(s['nonzero'])} non-zero parameters.{untried}")
    else:
        out.append(f"- **Compression did not pay off at the student's size**: {label(best_small)}, "
                   f"{ROLE.get(best_small, best_small)}, reaches perplexity {_f(models[best_small]['val_ppl'])}, "
                   f"{who.lower()} {_f(s['val_ppl'])}: the student is "
                   f"{_rel(s['val_ppl'], models[best_small]['val_ppl'])} it.")
    clauses = []
    order = ["scratch_full", "scratch", "finetune", "dense_plus"]  # the student's size first, then dense+
    s_steps = _steps_of(mans.get(s_name) or {}) if s_name == "distilled" else None
    for c in sorted(controls, key=lambda n: order.index(n) if n in order else len(order)):
        r, steps = models[c], _steps_of(mans.get(c) or {})
        same = "the same " if steps == s_steps else ""
        theirs = "" if steps == s_steps or s_steps is None or c == "scratch_full" else f", the student {s_steps}"
        what = {"finetune": f"fine-tuning the pruned student without the teacher for {same}{_int(steps)} steps"
                            f"{theirs}",
                "scratch": f"the same architecture trained from scratch for {_int(steps)} steps{theirs}",
                "scratch_full": f"the same architecture trained from scratch for {_int(steps)} steps",
                "dense_plus": f"the dense model trained {_int(steps)} steps more instead{theirs}"}.get(c, label(c))
        clauses.append(f"{_rel(s['val_ppl'], r['val_ppl'])} {what} ({label(c)}, perplexity {_f(r['val_ppl'])})")
    out.append(f"- {who} (perplexity {_f(s['val_ppl'])}) is " + "; ".join(clauses[:-1])
               + ("; and " if len(clauses) > 1 else "") + clauses[-1] + ".")
    d = models.get("dense_plus") or models.get("dense")
    if d is not None:
        sp_s, sp_d = ref_speedup(s, ref, graphed), ref_speedup(d, ref, graphed)
        speed = f"a student that runs {_f(sp_s / sp_d)}× as fast at {ref}" if sp_s and sp_d else "no speed figure"
        if sp_s and sp_d and (noisy(s["latency"].get(ref, {})) or noisy(d["latency"].get(ref, {}))):
            speed += " (timings noisy: a busy machine)"
        nz, dp = s["nonzero"] / d["nonzero"] - 1, s["val_ppl"] / d["val_ppl"] - 1
        size = f"{100 * abs(nz):.1f}% {'fewer' if nz <= 0 else 'more'} non-zero parameters"
        quality = f"{100 * abs(dp):.1f}% {'higher' if dp > 0 else 'lower'} perplexity"
        against = label("dense_plus") if "dense_plus" in models else "dense"
        out.append(f"- Against {against}, compression bought {size} and {speed}; it cost {quality}." if dp > 0 else
                   f"- Against {against}, compression bought {size}, {speed}, and {quality}.")
    return out


def budget_lines(models: dict[str, dict], mans: dict[str, dict]) -> list[str]:
    """The controls' budgets and recipes as their manifests record them."""
    out = []
    for name in (n for n, r in models.items() if r.get("stage") == "controls"):
        man = mans.get(name) or {}
        o, c = man.get("outputs", {}), man.get("config", {})
        masked = (f"; the stage-03 {o.get('method')} masks applied at initialisation and kept fixed through training"
                  if o.get("masks") and name.startswith("scratch") else "")
        notes = "".join(f"; {n}" for n in o.get("notes", []))
        out.append(f"- **{label(name)}**: {o.get('budget_rule', '?')}, recipe of {o.get('recipe_from', '?')} (LR "
                   f"{c.get('lr')}, warmup {c.get('warmup_steps')}, cosine to {c.get('min_lr_ratio')} of the peak, "
                   f"{c.get('micro_batch_size')} × {c.get('grad_accum')} sequences per rank and step, precision "
                   f"{man.get('metrics', {}).get('precision')}, world size {man.get('metrics', {}).get('world_size')})"
                   f"{masked}{notes}.")
    return out


def controls_section(run_dir: Path, manifests: dict[str, dict], models: dict[str, dict], ref: str) -> list[str]:
    """The headline, the controls table and the control budgets (Markdown lines)."""
    mans = model_manifests(run_dir, manifests, models)
    graphed = graphed_reference(models, ref)
    lines = ["## Headline", "", *headline_lines(models, mans, ref, graphed), "",
             "## Compression against its controls", "", *controls_table(models, mans, ref, graphed), "",
             "Steps: of the model's own stage / in all, counting the pretraining of the model it descends from; "
             "tokens, tokens per non-zero parameter, epochs over the training split and device-seconds (wall "
             "seconds of training × processes; GPU-seconds on CUDA, CPU-seconds on CPU) likewise in all. Student's "
             "ppl vs this: the distilled student's perplexity relative to the row's, + where the student is worse "
             "(lower perplexity is better). Speed-up: against the dense model at the main table's reference "
             "shape.", ""]
    budgets = budget_lines(models, mans) + missing_control_lines(run_dir, manifests, models)
    if budgets:
        lines += ["Control budgets, as each control's manifest records them (same data, validation split, "
                  "launcher and DeepSpeed config as the stage whose recipe it copies):", "", *budgets, ""]
    return lines


def missing_control_lines(run_dir: Path, manifests: dict[str, dict], models: dict[str, dict]) -> list[str]:
    """One line per control this run's evaluation does not hold: what it would be and the command that trains it."""
    from pipeline.controls import CONTROLS

    missing = [c for c in CONTROLS if c not in models]
    if not missing or not any(r.get("stage") == "controls" for r in models.values()):
        return []
    preset = manifests.get("pretrain", {}).get("config", {}).get("preset")
    steps = [manifests.get(s, {}).get("config", {}).get("max_steps") for s in ("pretrain", "distill")]
    every = " ".join(c for c in CONTROLS if c in models or c in missing)
    cmd = f"make all RUN={run_dir.name}{f' PRESET={preset}' if preset and preset != 'cpu' else ''} CONTROLS=\"{every}\""
    out = []
    for c in missing:
        why = (f" (the {preset} preset leaves it out of `make all`: stage 02 + 04's {steps[0]} + {steps[1]} steps do "
               f"not fit its 15-minute budget on 2 CPU cores)" if c == "scratch_full" and preset == "cpu" else "")
        out.append(f"- **{label(c)}** ({CONTROLS[c]}): not in this run{why}; `{cmd}` trains it and evaluates and "
                   f"reports again.")
    return out


def regime_section(manifests: dict[str, dict]) -> list[str]:
    """The pretraining's data regime (pipeline.regime): tokens per parameter, epochs, train/validation gap,
    whether validation loss rose, with the stage's warnings."""
    from pipeline.regime import CHINCHILLA_TOKENS_PER_PARAM, data_regime

    pre = manifests.get("pretrain")
    out = ["## Data regime of the pretraining", ""]
    if pre is None:
        return out + ["No stage 02 manifest in this run.", ""]
    g = pre.get("metrics", {}).get("regime")
    if not g:  # a manifest written before the diagnostics: the figures that can be rebuilt from the manifests
        dm, o, m = manifests.get("data", {}).get("metrics", {}), pre.get("outputs", {}), pre.get("metrics", {})
        seq = manifests.get("data", {}).get("outputs", {}).get("seq_len")
        if not (dm.get("train_blocks") and seq and o.get("n_params") and m.get("tokens_seen") is not None):
            return out + ["The stage 02 manifest holds no data-regime figures; re-run `make pretrain`.", ""]
        g = data_regime(o["n_params"], int(dm["train_blocks"]) * int(seq), m["tokens_seen"],
                        [m["final_train_loss"]] if m.get("final_train_loss") else (),
                        [(m.get("steps", 0), m["val_loss"])] if m.get("val_loss") is not None else ())
        out += ["(Rebuilt from the manifests: this stage 02 predates the diagnostics, so the gap uses the last "
                "logged training loss and whether validation loss rose is unknown.)", ""]
    rise = ("**has been rising**" if g["val_rising"] else
            "has not risen above its best" if len(g.get("val_history", [])) > 1 else "was measured once")
    out += [f"- {_int(g['tokens_seen'])} training tokens for {_int(g['n_params'])} parameters: "
            f"**{g['tokens_per_param']:.3g} tokens per parameter**, {g['chinchilla_fraction']:.2g}× the "
            f"compute-optimal ~{CHINCHILLA_TOKENS_PER_PARAM:g} of Hoffmann et al. (2022)"
            + (" (data-starved: a smaller model, or more data, would use this compute better)."
               if g["tokens_per_param"] < CHINCHILLA_TOKENS_PER_PARAM / 2 else "."),
            f"- **{g['epochs']:.3g} epochs** over the {_int(g['train_tokens'])}-token training split.",
            "- Train/validation gap at the end: "
            + (f"{g['train_val_gap']:+.3f} nats per token (validation {g['val_loss']:.3f}, training {g['train_loss']:.3f}, "
               f"the mean logged since the previous evaluation)." if g.get("train_val_gap") is not None else "–.")
            + f" Validation loss {rise}"
            + (f" (best {g['best_val_loss']:.4f} at step {g['best_val_step']})." if g.get("best_val_step") is not None
               else "."), ""]
    for w in g.get("warnings", []):
        out += [f"> **Warning**: {w}.", ""]
    return out


# ---------------------------------------------------------------------------------------------
# the report


def _precisions(manifests: dict[str, dict]) -> dict[str, Any]:
    """Training precision per training stage: the one it ran with (stage 04 records it under ``metrics``,
    stage 02 under ``outputs``) or, failing both, the one asked for (``config``, e.g. ``auto``)."""
    return {s: manifests[s].get("metrics", {}).get("precision") or manifests[s].get("outputs", {}).get("precision")
            or manifests[s].get("config", {}).get("precision")
            for s in ("pretrain", "distill") if s in manifests}


def rerun_eval_command(run: str, preset: Any) -> str:
    """The command that re-measures stage 05 and rebuilds the report (``FORCE=1``: the named targets alone are
    re-run, with ``--overwrite``; see the README's "Re-running one stage")."""
    return f"make eval report RUN={run}" + (f" PRESET={preset}" if preset else "") + " FORCE=1"


def agreement_lines(mans: dict[str, dict], models: dict[str, dict]) -> list[str]:
    """Where the stages' own perplexities differ from the table's, and why: the training stages evaluate in
    their training precision through the engine (bf16 on CPU), stages 03 and 05 in fp32, so the last digit can
    differ; the table always uses stage 05."""
    precs = _precisions(mans)
    rows = []
    for stage, name, what in (("pretrain", "dense", "end of pretraining"),
                              ("prune", "pruned", "right after pruning"),
                              ("distill", "pruned", "right after pruning, before distillation"),
                              ("distill", "distilled", "end of distillation")):
        m = mans.get(stage, {}).get("metrics", {})
        key = "student_val_ppl_before" if what.startswith("right after pruning, before") else "val_ppl"
        if m.get(key) is None or name not in models:
            continue
        prec = "fp32" if stage == "prune" else (precs.get(stage) or "?")
        rows.append([f"{STAGE_DIRS[stage]}", what, prec, _f(m[key], 3), _f(models[name]["val_ppl"], 3),
                     f"{100 * (m[key] / models[name]['val_ppl'] - 1):+.3f}%"])
    if not rows:
        return []
    return ["The stages measure perplexity too, each on the same validation tokens; the training stages do it in "
            "their training precision (through DeepSpeed), stages 03 and 05 in fp32. The table above uses "
            "stage 05 (fp32) throughout; the small differences below are the precision, not different models.", "",
            *_table(["stage", "figure", "precision", "stage's val ppl", "stage 05 val ppl (fp32)", "difference"],
                    rows), ""]


def timing_protocol_lines(out: dict[str, Any]) -> list[str]:
    """One paragraph on how stage 05 timed on CPU (interleaving, thread choice); empty for runs before it."""
    tp = out.get("timing_protocol") or {}
    if not tp.get("interleaved"):
        return []
    choice = tp.get("thread_choice")
    threads = (f"{out.get('threads')} thread(s), chosen on the dense model from "
               + " and ".join(f"{n} (median {c['median_ms']:.1f} ms, relative spread {c['rel_spread']:.2f})"
                              for n, c in choice["candidates"].items())
               + f" ({choice.get('rule', '')})" if choice else f"{out.get('threads')} thread(s), as configured")
    return [f"CPU timing protocol: the models' repeats ran interleaved, round-robin (a busy spell hits every model "
            f"alike), at {threads}; a figure is flagged ⚠ when its repeats, or its per-round ratio to dense, span "
            f"more than {tp.get('max_spread', 0.5):.0%} of the median.", ""]


def render(run: str, run_dir: Path, data: dict[str, Any], plots: dict[str, Path | None]) -> str:
    """The Markdown text of the report (plots linked by paths relative to ``run_dir``)."""
    mans, ev = data["manifests"], data["manifests"]["eval"]
    out, models = ev["outputs"], ev["metrics"]
    ref = f"b{out['reference_shape']['batch']}_t{out['reference_shape']['seq_len']}"
    prov = ev["provenance"]
    hw = prov.get("hardware", {})
    hw_text = f"{out.get('device_name', out['device'])}" + (
        f", {hw.get('cpus')} CPUs ({hw.get('machine')})" if hw else "")
    lines = [f"# Run `{run}`: what compression bought", "",
             f"Evaluated {prov.get('time', '?')} on {hw_text}, weights in {out['dtype']}, "
             f"{out.get('threads', '?')} CPU threads; perplexity over {_int(out.get('val_tokens'))} validation tokens "
             f"in blocks of {out.get('val_seq_len')}. Every figure below comes from the stages' manifests and "
             f"metric logs.", "", *timing_protocol_lines(out)]
    if out.get("val_warning"):
        lines += [f"> **Small validation split**: {out['val_warning']}.", ""]
    for stage, why in out.get("missing", {}).items():
        lines += [f"> **No {stage} stage in this run** ({why}): its row is absent and the rest of the report "
                  f"is built without it. Run `make report RUN={run} PRESET={ev['config'].get('preset')}` to add it "
                  f"(it makes the missing stage, then re-evaluates).", ""]
    lines += [*controls_section(run_dir, mans, models, ref), *regime_section(mans),
              "## Summary", "", *summary_lines(models), *filter(None, [recipe_line(mans)]), "",
              "## Models", "", *model_table(models, ref), "",
              f"Δ: relative change against the dense model. Speed-up: dense latency / model latency at batch × seq len "
              f"= {ref.replace('b', '').replace('_t', ' × ')}"
              f"{', forward passes replayed from CUDA graphs (no host launch cost)' if graphed_reference(models, ref) else ''}"
              f", measured in the same run (median of "
              f"{ev['config'].get('repeats')} after {ev['config'].get('warmup')} warm-up calls). Unstructured zeros "
              f"do not shrink dense safetensors; the bitmask + values column is the size a sparse format would take.",
              *(["", f"**Timings are noisy**: at {ref} some model's figure is flagged ⚠ (a busy machine: "
                 + "; ".join(f"`{k}`: {v.format(max_spread=ev['config'].get('max_spread') or 0.5)}"
                             for k, v in FLAG_TEXT.items())
                 + "; runs made before the flags: the slowest repeat over twice the fastest); compare those speed-ups "
                 f"only from a run on an idle machine: `{rerun_eval_command(run, ev['config'].get('preset'))}`."]
                if any(noisy(r["latency"].get(ref, {})) or r.get("gen_flags") for r in models.values()) else []),
              "", *agreement_lines(mans, models),
              "### Decoding (static KV cache)", "", *decode_table(models), "",
              "### Forward latency per shape", "", *latency_table(models), "",
              *(["### Generation", "", *generation_table(models), ""] if generation_table(models) else []),
              "### 2:4 semi-structured sparsity", "", *sparse_24_section(models, out["device"]), "",
              "## Plots", ""]
    captions = {"losses": "Training loss curves", "loss_scale": "Dynamic loss scale",
                "quality": "Perplexity against sparsity and parameters"}
    for key, p in plots.items():
        if p is not None:
            lines += [f"![{captions[key]}]({os.path.relpath(p, run_dir)})", ""]
    if plots.get("loss_scale") is None:
        precs = _precisions(mans)
        lines += [f"No `train/loss_scale` was logged (precision {precs or 'unknown'}): dynamic loss scaling exists "
                  f"only for fp16 training, so there is no loss-scale plot.", ""]
    if plots.get("losses") is None:
        lines += ["No training loss was logged by pretrain or distill (no metrics.jsonl found).", ""]
    lines += ["## Samples", "", f"Greedy continuation of the same prompt by each model "
              f"({ev['config'].get('gen_tokens')} new tokens):", "", f"Prompt: `{out['prompt']}`"
              + (f" ({out['prompt_source']}; `EVAL_ARGS=\"--prompt '...'\"` sets another)"
                 if out.get("prompt_source") else ""), ""]
    for name, text in out.get("samples", {}).items():
        lines += [f"**{name}**", "", "```text", out["prompt"] + text, "```", ""]
    lines += ["## Provenance", ""]
    rows = []
    for stage, man in mans.items():
        p = man.get("provenance", {})
        commit = (p.get("git_commit") or "?")[:10] + (" (dirty)" if p.get("git_dirty") else "")
        rows.append([f"{STAGE_DIRS[stage]}", _f(man.get("wall_time_s"), 1), commit, str(p.get("launcher", "?")),
                     str(p.get("world_size", "?")), str(p.get("host", "?")), str(p.get("time", "?"))])
    total = sum(m.get("wall_time_s") or 0 for m in mans.values())
    lines += _table(["stage", "wall time s", "commit", "launcher", "world size", "host", "finished"], rows)
    lines += ["", f"Total wall time of the stages: {total / 60:.1f} min.", ""]
    pk = prov.get("packages", {})
    lines += ["Packages (at evaluation): " + ", ".join(f"{k} {v}" for k, v in pk.items() if v) +
              f"; Python {prov.get('python', '?')}.", "",
              f"Hardware (at evaluation): `{json.dumps(hw)}`.", ""]
    lines += ["Configurations as each stage resolved them:", ""]
    for stage, man in mans.items():
        lines += [f"<details><summary>{STAGE_DIRS[stage]}</summary>", "", "```json",
                  json.dumps(man.get("config", {}), indent=1, default=str), "```", "", "</details>", ""]
    lines += ["## TensorBoard", "", "Every stage's scalars side by side:", "", "```bash",
              f"tensorboard --logdir {run_dir / 'tb'}", "```", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` and ``<run_dir>/plots/*.png``; return the report's path.

    Raises:
        StageError: when stage 05 has not run (names ``make eval``); nothing is written then.
    """
    run_dir = Path(run_dir)
    data = collect(run_dir)
    models = data["manifests"]["eval"]["metrics"]
    plot_dir = run_dir / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "losses": plot_losses(data["metrics"], plot_dir / "loss_curves.png"),
        "loss_scale": plot_loss_scale(data["metrics"], plot_dir / "loss_scale.png", _precisions(data["manifests"])),
        "quality": plot_quality_vs_size(models, plot_dir / "ppl_vs_sparsity.png"),
    }
    text = render(run_dir.name, run_dir, data, plots)
    path = run_dir / "report.md"
    tmp = path.with_name(f".report.md.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
