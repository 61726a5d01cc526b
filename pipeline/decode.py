"""Greedy decoding as a server runs it: a static KV cache and a decode step replayed from a CUDA graph.

Hugging Face's eager ``generate`` re-launches every kernel of every layer from Python at each new token, so
for models below a few billion parameters its tokens/s measure the host, not the model (the H200 figure is in
``results/bench/NOTES.md``, "Figures moved out of docstrings").  Serving stacks (vLLM, TensorRT-LLM, transformers'
own ``cache_implementation="static"`` with ``torch.compile(mode="reduce-overhead")``) pre-allocate the KV cache
and replay the one-token step from a CUDA graph.  :class:`StaticDecoder` does the same with transformers'
``StaticCache``:

- ``prefill``: one eager forward pass over the ``(batch, prompt)`` token ids fills the cache and gives the
  first new token (time to first token);
- each further token: one forward pass of ``(batch, 1)`` ids at the cache's current length, then the argmax
  written back into the same input buffer, so the step has fixed shapes and addresses, reads its position from
  the cache's device-side length counter and never synchronises the host;
- ``path`` (how the step runs): ``graph`` (CUDA: captured once in a ``torch.cuda.CUDAGraph`` and replayed),
  ``compile`` (the step's forward through ``torch.compile``; on CUDA ``mode="reduce-overhead"``, i.e. CUDA
  graphs made by Inductor; elsewhere the given backend), or ``eager`` (the same static-cache step, launched from
  Python: the path on CPU, and the fallback when a capture fails).

The tokens are those of greedy decoding (``generate(do_sample=False)`` with EOS ignored):
``tests/test_decode.py`` checks them against Hugging Face's eager ``generate`` on a real tiny LLaMA.

Every use of transformers' cache internals (the ``StaticCache`` constructor, the per-layer length counter that
is rewound between measurements, the name of the cache argument) is in this module, gated on what the installed
version has; verified against transformers 5.17 and 5.24.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from pipeline.timing import timing_flags

DecodePath = Literal["auto", "graph", "compile", "eager"]
PATHS = ("auto", "graph", "compile", "eager")


# ---------------------------------------------------------------------------------------------
# transformers' static cache, version-gated


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The name of the forward's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def logits_kwargs(model: nn.Module) -> dict[str, int]:
    """Keyword arguments that restrict the logits to the last position (``logits_to_keep=1``, transformers >=
    4.50; ``num_logits_to_keep`` in 4.45-4.49), or none when the model has neither."""
    params = _forward_params(model)
    for k in ("logits_to_keep", "num_logits_to_keep"):
        if k in params:
            return {k: 1}
    return {}


def new_static_cache(model: nn.Module, batch: int, max_len: int):
    """A ``transformers.StaticCache`` for ``batch`` sequences of at most ``max_len`` tokens.

    transformers 5 allocates its tensors lazily at the first update (the prefill), on the device and in the
    dtype of the keys; 4.x wanted ``max_batch_size``, ``device`` and ``dtype`` up front.

    Raises:
        RuntimeError: when this transformers has no ``StaticCache`` (names the version).
    """
    try:
        from transformers import StaticCache
    except ImportError as e:  # pragma: no cover - very old transformers
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no StaticCache; install transformers >= 4.45"
                           ) from e
    p = next(model.parameters())
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # transformers 4.x signature
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=p.device,
                           dtype=p.dtype)


def set_cache_length(cache, length: int) -> None:
    """Rewind (or advance) every layer of a static cache to ``length`` cached tokens, in place.

    transformers 5 keeps each ``StaticLayer``'s length in a device tensor ``cumulative_length`` that its
    ``update`` advances in place (which is what makes the step capturable); writing it in place keeps the
    address a captured graph reads.  The stale keys/values beyond ``length`` are masked out by the causal mask
    (positions after the query's) until overwritten.

    Raises:
        RuntimeError: a cache whose layers keep no ``cumulative_length`` (another transformers layout).
    """
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(la, "cumulative_length", None), torch.Tensor) for la in layers):
        import transformers

        raise RuntimeError(f"the StaticCache of transformers {transformers.__version__} keeps no per-layer "
                           f"cumulative_length tensor; the static decode path supports transformers 5.x")
    for la in layers:
        la.cumulative_length.fill_(length)


# ---------------------------------------------------------------------------------------------
# the decoder


class StaticDecoder:
    """Greedy decoding of ``batch`` sequences with a static KV cache; see the module docstring.

    Args:
        model: a causal LM of transformers 5 (``LlamaForCausalLM``, ...) in eval mode, on its device.
        batch: sequences decoded together.
        prompt_len: tokens of every prompt (all prompts of a batch have this length; no padding).
        new_tokens: tokens generated per sequence (``>= 1``; the first comes from the prefill).
        path: ``graph``, ``compile``, ``eager`` or ``auto`` (``graph`` on CUDA, ``eager`` elsewhere).
        compile_backend: the ``torch.compile`` backend of the ``compile`` path off CUDA (``inductor`` needs a
            C++ compiler; ``eager`` only traces, a check that the step has no graph break).

    The cache holds ``prompt_len + max(new_tokens, 4)`` positions (the CUDA-graph warm-up runs three steps
    before the capture; the cache is rewound after them).  Building a ``graph`` decoder runs one prefill (the
    cache's tensors must exist before the capture), three warm-up steps and the capture.

    Raises:
        ValueError: bad sizes, or an unknown ``path``; ``graph`` without CUDA.
        RuntimeError: the capture or the compilation failed (callers fall back to ``eager``).
    """

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, new_tokens: int, path: DecodePath = "auto",
                 compile_backend: str = "inductor"):
        if batch < 1 or prompt_len < 1 or new_tokens < 1:
            raise ValueError(f"batch, prompt_len and new_tokens must be positive, got {batch}, {prompt_len}, "
                             f"{new_tokens}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        self.model = model
        self.device = next(model.parameters()).device
        if path == "auto":
            path = "graph" if self.device.type == "cuda" else "eager"
        if path == "graph" and self.device.type != "cuda":
            raise ValueError("path='graph' needs a CUDA model (CUDA graphs); use 'eager' or 'compile' on CPU")
        self.path = path
        self.batch, self.prompt_len, self.new_tokens = batch, prompt_len, new_tokens
        self.max_len = prompt_len + max(new_tokens, 4)
        self.cache = new_static_cache(model, batch, self.max_len)
        self._kw = {cache_kwarg(model): self.cache, "use_cache": True, **logits_kwargs(model)}
        self.prompt = torch.zeros(batch, prompt_len, dtype=torch.long, device=self.device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the step's input and output
        self.tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=self.device)
        self._forward: Callable[..., Any] = model
        self._replay: Callable[[], Any] | None = None
        if path == "compile":
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            backend = "inductor" if self.device.type == "cuda" else compile_backend
            self._forward = torch.compile(model, mode=mode, backend=backend, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            self.prefill()  # allocates the cache's tensors (lazily, at their first update)
            if path == "graph":
                self._replay = self._capture()
            elif path == "compile":
                for _ in range(3):  # compiles (and on CUDA records its graphs) outside any timing
                    self._step()
            set_cache_length(self.cache, 0)

    @torch.inference_mode()
    def _step(self) -> None:
        logits = self._forward(input_ids=self.ids, **self._kw).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def _capture(self) -> Callable[[], Any]:
        """Warm up on a side stream (the PyTorch CUDA-graphs recipe), capture one step, rewind the cache."""
        ids0 = self.ids.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step()
        set_cache_length(self.cache, self.prompt_len)
        self.ids.copy_(ids0)
        self._graph = g  # keeps the graph (and its memory pool) alive with the decoder
        return g.replay

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Rewind the cache, run the prompt (``(batch, prompt_len)`` ids; default: the last one given) and
        return the first new token of every sequence, ``(batch, 1)`` (also in ``tokens[:, 0]``)."""
        if prompt is not None:
            if tuple(prompt.shape) != (self.batch, self.prompt_len):
                raise ValueError(f"prompt of shape {tuple(prompt.shape)}, this decoder takes "
                                 f"({self.batch}, {self.prompt_len})")
            self.prompt.copy_(prompt)
        set_cache_length(self.cache, 0)
        logits = self.model(input_ids=self.prompt, **self._kw).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.tokens[:, :1].copy_(self.ids)
        return self.ids

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """The remaining ``new_tokens - 1`` greedy steps after :meth:`prefill`; returns ``tokens``
        ``(batch, new_tokens)`` (a buffer the next call overwrites)."""
        step = self._replay or self._step
        for i in range(1, self.new_tokens):
            step()
            self.tokens[:, i:i + 1].copy_(self.ids)
        return self.tokens

    def generate(self, prompt: torch.Tensor) -> torch.Tensor:
        """Greedy continuation of ``prompt`` ``(batch, prompt_len)`` by ``new_tokens`` tokens: a copy of
        ``(batch, new_tokens)`` ids."""
        self.prefill(prompt)
        return self.decode().clone()


def build_decoder(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, path: DecodePath = "auto",
                  compile_backend: str = "inductor") -> tuple[StaticDecoder, str | None]:
    """A :class:`StaticDecoder` on ``path``, falling back to ``eager`` when the capture or compilation fails;
    returns the decoder and the failure (``"<path>: <error>"``) or ``None``."""
    try:
        return StaticDecoder(model, batch, prompt_len, new_tokens, path, compile_backend), None
    except Exception as e:  # noqa: BLE001 - the fallback is reported with the reason
        err = f"{path}: {type(e).__name__}: {e}"[:300]
        if path == "eager" or (path == "auto" and next(model.parameters()).device.type != "cuda"):
            raise
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        return StaticDecoder(model, batch, prompt_len, new_tokens, "eager"), err


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_decoder(dec: StaticDecoder, prompt: torch.Tensor, warmup: int, repeats: int) -> dict[str, Any]:
    """Time to first token and decode speed of ``dec`` on ``prompt``: ``warmup`` untimed generations, then
    ``repeats`` timed ones.

    Each generation is timed in two spans: the prefill with its first token (``ttft_ms``), and the
    ``new_tokens - 1`` decode steps (``ms_per_token`` = span / steps).  CUDA: ``torch.cuda.Event`` records
    around each span, read after one synchronise (device time, host overhead included where the GPU waited on
    the host; the host is synchronised before each generation). CPU: ``time.perf_counter``.

    Returns ``{"path", "batch", "prompt_len", "new_tokens", "ttft_ms", "ms_per_token", "tok_s"`` (``batch /
    ms_per_token``: new tokens per second over the batch), ``"tok_s_per_seq"``, ``"ms_per_token_min"``,
    ``"ms_per_token_max"``, ``"repeats"}``: medians over the repeats.  With ``new_tokens == 1`` the decode
    figures are ``None``.
    """
    dev = dec.device
    for _ in range(warmup):
        dec.generate(prompt)
    _sync(dev)
    ttft, per_tok = [], []
    steps = dec.new_tokens - 1
    for _ in range(repeats):
        _sync(dev)
        if dev.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            dec.prefill(prompt)
            e1.record()
            dec.decode()
            e2.record()
            torch.cuda.synchronize()
            ttft.append(e0.elapsed_time(e1))
            per_tok.append(e1.elapsed_time(e2) / steps if steps else float("nan"))
        else:
            t0 = time.perf_counter()
            dec.prefill(prompt)
            t1 = time.perf_counter()
            dec.decode()
            t2 = time.perf_counter()
            ttft.append((t1 - t0) * 1e3)
            per_tok.append((t2 - t1) * 1e3 / steps if steps else float("nan"))
    ms = statistics.median(per_tok) if steps else None
    return {"path": dec.path, "batch": dec.batch, "prompt_len": dec.prompt_len, "new_tokens": dec.new_tokens,
            "ttft_ms": statistics.median(ttft), "ms_per_token": ms,
            "tok_s": dec.batch / (ms / 1e3) if ms else None, "tok_s_per_seq": 1e3 / ms if ms else None,
            "ms_per_token_min": min(per_tok) if steps else None, "ms_per_token_max": max(per_tok) if steps else None,
            "repeats": repeats}


def measure_decode(models: dict[str, nn.Module], prompt_ids: torch.Tensor, batch_sizes: list[int],
                   new_tokens: int, warmup: int, repeats: int, path: DecodePath = "auto", rounds: int = 2,
                   baseline: str | None = None, fallback: bool = True,
                   check_tokens: bool = True, max_spread: float = 0.5) -> dict[str, dict[str, dict]]:
    """Decode speed of every model at every batch size, interleaved: for each batch size, ``rounds`` rounds
    that each time every model in turn (``repeats`` generations each), so slow drift of the machine hits
    every model alike; a figure is the median over the rounds of each round's median.

    Args:
        models: name -> causal LM, all on one device, eval mode (the decoders are built once per model and
            batch size and live until the end).
        prompt_ids: ``(1, prompt_len)`` ids; a batch of ``b`` repeats it ``b`` times (same length, no padding).
        baseline: a key of ``models``; when given each row also gets ``speedup_tok_s`` (model tok/s / baseline
            tok/s) and ``speedup_ttft`` (baseline TTFT / model TTFT).
        fallback: a failed capture/compilation falls back to the eager path (else: the row records the error).
        check_tokens: at batch 1, compare the graph/compile path's tokens with the eager static path's.
        max_spread: threshold of the timing flags (:func:`pipeline.timing.timing_flags`) over the rounds'
            ms-per-token figures: ``spread`` when they span more than this fraction of their median, ``ratio``
            when the per-round ratio to ``baseline`` does.

    Returns ``{name: {"b<batch>": row}}`` with the fields of :func:`time_decoder` (medians over
    ``rounds * repeats``; min/max over all of them), ``round_ms_per_token`` (each round's median), ``flags``,
    ``fallback`` (why the asked path was not used, or ``None``), and per batch size 1
    ``tokens_match_eager`` on the graph/compile paths (its greedy tokens equal those of the eager static path),
    or ``error`` for a measurement that failed.
    """
    out: dict[str, dict[str, dict]] = {name: {} for name in models}
    for b in batch_sizes:
        prompt = prompt_ids.expand(b, -1).contiguous()
        decs: dict[str, StaticDecoder] = {}
        for name, m in models.items():
            try:
                if fallback:
                    decs[name], fb = build_decoder(m, b, prompt.shape[1], new_tokens, path)
                else:
                    decs[name], fb = StaticDecoder(m, b, prompt.shape[1], new_tokens, path), None
                out[name][f"b{b}"] = {"fallback": fb}
                if check_tokens and b == 1 and decs[name].path != "eager":
                    ref = StaticDecoder(m, 1, prompt.shape[1], new_tokens, "eager").generate(prompt)
                    out[name]["b1"]["tokens_match_eager"] = bool(torch.equal(ref, decs[name].generate(prompt)))
            except Exception as e:  # noqa: BLE001 - recorded, the other models go on
                out[name][f"b{b}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        samples: dict[str, list[dict]] = {name: [] for name in decs}
        for r in range(rounds):
            for name, dec in decs.items():
                try:
                    samples[name].append(time_decoder(dec, prompt, warmup if r == 0 else 1, repeats))
                except Exception as e:  # noqa: BLE001
                    out[name][f"b{b}"]["error"] = f"{type(e).__name__}: {e}"[:300]
        for name, rows in samples.items():
            if rows:
                row = dict(rows[0])
                for k in ("ttft_ms", "ms_per_token"):
                    vals = [x[k] for x in rows if x[k] is not None]
                    row[k] = statistics.median(vals) if vals else None
                # the slowest and fastest step over every round (rows[0]'s alone could leave the median outside them)
                for k, pick in (("ms_per_token_min", min), ("ms_per_token_max", max)):
                    vals = [x[k] for x in rows if x.get(k) is not None]
                    row[k] = pick(vals) if vals else None
                row["round_ms_per_token"] = [x["ms_per_token"] for x in rows if x["ms_per_token"] is not None]
                ms = row["ms_per_token"]
                row["tok_s"] = b / (ms / 1e3) if ms else None
                row["tok_s_per_seq"] = 1e3 / ms if ms else None
                row["repeats"] = rounds * repeats
                out[name][f"b{b}"].update(row)
        del decs
    for name, rows in out.items():
        for key, row in rows.items():
            base = out.get(baseline, {}).get(key, {}) if baseline is not None else {}
            if row.get("round_ms_per_token"):
                # untrustworthy figures say so (pipeline.timing): rounds that disagree, or a speed-up that moved
                ref = base.get("round_ms_per_token") if name != baseline else None
                same_rounds = ref is not None and len(ref) == len(row["round_ms_per_token"])
                row["flags"] = timing_flags(row["round_ms_per_token"], ref if same_rounds else None, max_spread)
            if row.get("tok_s") and base.get("tok_s"):
                row["speedup_tok_s"] = row["tok_s"] / base["tok_s"]
            if row.get("ttft_ms") and base.get("ttft_ms"):
                row["speedup_ttft"] = base["ttft_ms"] / row["ttft_ms"]
    return out
