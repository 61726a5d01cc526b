"""Stage 05's CPU timing protocol: figures a shared, busy machine cannot skew without saying so.

Timing models one after another lets a busy spell (another job on the machine) land on one model only, and
with as many threads as cores a contended machine is slow *and* steady, so no spread check fires.  The
protocol here:

1. **Interleaved repeats** (:func:`interleaved_times`): every model is warmed up, then the timed repeats
   run round-robin, one call per model per round, the round's starting model rotating, so a busy spell hits
   every model alike and each round gives paired figures (same moment, same machine state).
2. **A stable thread count** (:func:`choose_threads`): one probe is timed at each candidate count (1 thread
   and all cores by default); 1 thread is kept unless more threads are both faster and at least as steady,
   and every measurement is recorded.
3. **The spread is reported** (:func:`summarize`): min, quartiles, median and max of every figure.
4. **Untrustworthy figures are flagged** (:func:`timing_flags`): ``spread`` when a figure's
   ``(max - min) / median`` exceeds ``max_spread``; ``ratio`` when the per-round ratio against the baseline
   model (the speed-up, paired within rounds) varies by more than ``max_spread`` of its median.

Everything takes the clock as an argument, so tests drive it with a fake clock and check the call order.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: default threshold of the flags: a figure whose repeats span more than half its median is not trusted
DEFAULT_MAX_SPREAD = 0.5


def interleaved_times(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall time in milliseconds of ``repeats`` calls of each function, the calls interleaved round-robin.

    ``warmup`` untimed rounds (every function once per round) come first.  Timed round ``r`` calls the
    functions in their given order rotated by ``r`` (round 0: a, b, c; round 1: b, c, a; ...), so that no
    function always follows the same one.  ``clock`` returns seconds (``time.perf_counter`` by default).

    Returns ``{name: [ms of round 0, ms of round 1, ...]}``: index ``r`` of every list is the same round.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    k = len(names)
    for r in range(repeats):
        for n in names[r % k:] + names[: r % k] if k else []:
            t0 = clock()
            fns[n]()
            out[n].append((clock() - t0) * 1e3)
    return out


def relative_spread(values: Sequence[float]) -> float:
    """``(max - min) / median`` of ``values`` (0 for fewer than two values; ``inf`` for a zero median)."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else float("inf")


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """``median_ms``, ``min_ms``, ``q1_ms``, ``q3_ms`` (quartiles, ``statistics.quantiles`` inclusive method),
    ``max_ms`` and ``rel_spread`` (:func:`relative_spread`) of one figure's repeats.

    Raises:
        ValueError: on an empty sequence.
    """
    if not times_ms:
        raise ValueError("no timings to summarize")
    q1, _, q3 = (statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1
                 else (times_ms[0],) * 3)
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "q1_ms": q1, "q3_ms": q3,
            "max_ms": max(times_ms), "rel_spread": relative_spread(times_ms)}


def paired_ratios(baseline_ms: Sequence[float], model_ms: Sequence[float]) -> list[float]:
    """Per-round speed-up ``baseline / model`` of two interleaved series (index = round)."""
    return [b / m for b, m in zip(baseline_ms, model_ms) if m > 0]


def timing_flags(times_ms: Sequence[float], baseline_ms: Sequence[float] | None,
                 max_spread: float = DEFAULT_MAX_SPREAD) -> list[str]:
    """Why a figure is not trustworthy; empty when it is.

    - ``"spread"``: the repeats' ``(max - min) / median`` exceeds ``max_spread``;
    - ``"ratio"``: the per-round ratio against ``baseline_ms`` (from :func:`paired_ratios`) has a relative
      spread over ``max_spread``, i.e. the speed-up changed with the moment it was measured.
    """
    flags = []
    if relative_spread(times_ms) > max_spread:
        flags.append("spread")
    if baseline_ms is not None and relative_spread(paired_ratios(baseline_ms, times_ms)) > max_spread:
        flags.append("ratio")
    return flags


def choose_threads(probe: Callable[[], Any], warmup: int, repeats: int, candidates: Sequence[int] | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   set_threads: Callable[[int], None] = torch.set_num_threads,
                   tolerance: float = 0.05) -> dict[str, Any]:
    """Time ``probe`` at each thread count and keep a count that is both steady and not slowed by contention;
    leaves torch at the chosen count.

    The fewest threads is the default; a larger count replaces the current choice only when it is faster (lower
    median) *and* at least as steady (``rel_spread`` no more than ``tolerance`` above).  On an oversubscribed
    machine all cores can be slow *and* steady (seen on the 2-core CI machine, figures in
    ``results/bench/NOTES.md``, issue 20's section), which a rule on the spread alone would pick.

    Args:
        probe: one representative call (e.g. the dense model's forward at the reference shape).
        warmup, repeats: untimed and timed calls per candidate.
        candidates: thread counts to try; default ``[1, os.cpu_count()]`` (one entry on a one-core machine).
        clock, set_threads: injected for tests; ``time.perf_counter`` and ``torch.set_num_threads``.
        tolerance: how much larger a relative spread may be and still count as "as steady".

    Returns ``{"threads": chosen, "candidates": {count: summarize(...)}, "rule": text}``.
    """
    counts = sorted(set(candidates or [1, os.cpu_count() or 1]))
    measured = {}
    for n in counts:
        set_threads(n)
        measured[n] = summarize(interleaved_times({"probe": probe}, warmup, repeats, clock)["probe"])
    chosen = counts[0]
    for n in counts[1:]:
        if (measured[n]["median_ms"] < measured[chosen]["median_ms"]
                and measured[n]["rel_spread"] <= measured[chosen]["rel_spread"] + tolerance):
            chosen = n
    set_threads(chosen)
    return {"threads": chosen, "candidates": measured,
            "rule": f"fewest threads unless more are faster and at least as steady ((max - min) / median within "
                    f"{tolerance:g})"}


@torch.inference_mode()
def interleaved_forward_latency(models: dict[str, torch.nn.Module], vocab_size: int, batch_sizes: list[int],
                                seq_lens: list[int], warmup: int, repeats: int, baseline: str = "dense",
                                max_spread: float = DEFAULT_MAX_SPREAD, seed: int = 0,
                                clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, dict]]:
    """Forward latency of several models (logits of every position, no KV cache), shape by shape, the
    models' repeats interleaved (:func:`interleaved_times`), all models fed the same random token ids.

    Returns ``{model: {"b<batch>_t<seq>": row}}`` where ``row`` holds ``batch``, ``seq_len``, ``latency_ms``
    (median), ``latency_min_ms``, ``latency_q1_ms``, ``latency_q3_ms``, ``latency_max_ms``, ``rel_spread``,
    ``tokens_per_s`` (``batch * seq_len / median``), ``times_ms`` (per round) and ``flags``
    (:func:`timing_flags` against ``baseline``, which must be a key of ``models`` to get ``ratio`` flags).
    """
    from functools import partial

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, dict]] = {name: {} for name in models}
    for b in batch_sizes:
        for t in seq_lens:
            ids = torch.randint(0, vocab_size, (b, t), generator=gen)
            fns = {name: partial(m, input_ids=ids.to(next(m.parameters()).device), use_cache=False)
                   for name, m in models.items()}
            times = interleaved_times(fns, warmup, repeats, clock)
            for name, ts in times.items():
                s = summarize(ts)
                out[name][f"b{b}_t{t}"] = {
                    "batch": b, "seq_len": t, "latency_ms": s["median_ms"], "latency_min_ms": s["min_ms"],
                    "latency_q1_ms": s["q1_ms"], "latency_q3_ms": s["q3_ms"], "latency_max_ms": s["max_ms"],
                    "rel_spread": s["rel_spread"], "tokens_per_s": b * t / (s["median_ms"] / 1e3),
                    "times_ms": ts,
                    "flags": timing_flags(ts, times.get(baseline) if name != baseline else None, max_spread),
                }
    return out


def interleaved_generation(models: dict[str, torch.nn.Module], tokenizer: Any, prompt: str, new_tokens: int,
                           repeats: int, baseline: str = "dense", max_spread: float = DEFAULT_MAX_SPREAD,
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Greedy generation speed at batch 1 (prompt prefill included) of several models, one untimed
    generation each, then ``repeats`` rounds interleaved (:func:`interleaved_times`); generation goes through
    :func:`pipeline.evaluate.generate`.

    Returns ``{model: {"gen_tokens_per_s": median, "gen_tokens_per_s_min", "gen_tokens_per_s_max",
    "gen_rel_spread", "gen_times_ms", "gen_flags"}}`` (tokens/s = ``new_tokens`` / time; min/max of tokens/s
    come from the slowest/fastest repeat).
    """
    from pipeline.evaluate import generate

    fns = {name: (lambda m=m: generate(m, tokenizer, prompt, new_tokens)) for name, m in models.items()}
    times = interleaved_times(fns, 1, repeats, clock)
    out = {}
    for name, ts in times.items():
        s = summarize(ts)
        out[name] = {"gen_tokens_per_s": new_tokens / (s["median_ms"] / 1e3),
                     "gen_tokens_per_s_min": new_tokens / (s["max_ms"] / 1e3),
                     "gen_tokens_per_s_max": new_tokens / (s["min_ms"] / 1e3),
                     "gen_rel_spread": s["rel_spread"], "gen_times_ms": ts,
                     "gen_flags": timing_flags(ts, times.get(baseline) if name != baseline else None, max_spread)}
    return out
