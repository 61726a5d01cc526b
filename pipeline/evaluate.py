"""Stage 05: measure every model of a run on the same validation tokens and the same hardware.

For each model found through the run's manifests (dense from ``02_pretrain``, pruned from ``03_prune``,
distilled from ``04_distill``) the stage measures

- quality: mean next-token cross-entropy on the stage-01 validation tokens and its perplexity
  ``exp(loss)`` (always in fp32, so that CPU and GPU figures agree);
- size: total and non-zero parameters (tied weights counted once), sparsity overall and over the
  prunable linear weights, bytes of the exported safetensors, and the bytes a bitmask + values
  encoding of the same weights would take;
- speed: forward latency (median over ``repeats`` timed calls after ``warmup`` untimed ones) and
  throughput in tokens/s for every (batch size, sequence length), and greedy generation tokens/s;
  speed-up = dense latency / model latency, both measured in this run;
- on CUDA: fp16 weights; latency eager and captured in a CUDA graph (removes per-call host overhead);
  models whose prunable weights follow the 2:4 pattern also run with
  ``torch.sparse.to_sparse_semi_structured`` weights, against the same model dense, per shape and per
  linear-layer shape, so that the shapes where 2:4 loses are reported too;
- decoding as a server runs it (``decode``, :mod:`pipeline.decode`): static KV cache, the decode step replayed
  from a CUDA graph on CUDA (eager on CPU), every model interleaved: time to first token, ms per token, tok/s.

Timings use ``torch.cuda.Event`` on CUDA and ``time.perf_counter`` on CPU, under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.compat.torch_compat import semi_structured_weight
from pipeline.config import CommonConfig, ConfigError, doc
from pipeline.manifest import StageError, require_stage, stage_dir

#: evaluable stages, in pipeline order, and the name each model gets in tables and TensorBoard tags
MODEL_STAGES = {"pretrain": "dense", "prune": "pruned", "distill": "distilled"}


@dataclass
class EvalConfig(CommonConfig):
    """Configuration of stage 05 (evaluation)."""

    models: list[str] = doc(
        "Stages whose models are evaluated, from pretrain, prune, distill, controls (every finished control of "
        "06_controls); empty: every one that exists (pretrain is always required: it is the dense baseline of "
        "every speed-up).",
        default_factory=list,
    )
    batch_sizes: list[int] = doc("Batch sizes of the forward-latency measurements.", default_factory=lambda: [1, 8])
    seq_lens: list[int] = doc("Sequence lengths (tokens) of the forward-latency measurements.",
                              default_factory=lambda: [128])
    repeats: int = doc("Timed calls per measurement; the median is reported.", 5)
    warmup: int = doc("Untimed calls before each measurement (allocator, kernels selection, caches).", 2)
    gen_tokens: int = doc("New tokens per greedy generation (model.generate, KV cache on).", 32)
    gen_repeats: int = doc("Timed generations per model; the median is reported.", 3)
    prompt: str = doc("Prompt of the generated sample and of the generation-speed measurement ('': the first "
                      "words of the run's first validation document, see pipeline.data.validation_prompt).", "")
    val_batch_size: int = doc("Sequences per forward pass of the validation-loss measurement.", 8)
    max_val_tokens: int = doc("Validation tokens used for the loss (0: all of them).", 0)
    device: Literal["auto", "cpu", "cuda"] = doc("Where to measure: auto is cuda when available, else cpu.", "auto")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = doc(
        "Weight dtype of the speed measurements: auto is fp16 on CUDA and fp32 on CPU "
        "(perplexity is always measured in fp32).", "auto")
    sparse_24: bool = doc("On CUDA, also time 2:4 models with torch.sparse.to_sparse_semi_structured weights "
                          "(ignored on CPU, where that kernel does not exist).", True)
    cuda_graphs: bool = doc("On CUDA, also time forward passes captured in a CUDA graph.", True)
    threads: int = doc("CPU threads of the speed measurements (0: on CPU, time the dense model at 1 thread and at all "
                       "cores and keep 1 unless all cores are faster and as steady, see pipeline.timing.choose_threads; on CUDA "
                       "torch's default).",
                       0)
    max_spread: float = doc("CPU timings: a figure whose repeats span more than this fraction of their median "
                            "((max - min) / median), or whose per-round ratio to dense does, is flagged untrustworthy.",
                            0.5)
    decode: bool = doc("Also time greedy decoding as a server runs it (pipeline/decode.py: static KV cache, "
                       "decode step replayed from a CUDA graph on CUDA, eager on CPU), every model interleaved.",
                       True)
    decode_batch_sizes: list[int] = doc("Batch sizes of the decode measurement (1 and a serving batch).",
                                        default_factory=lambda: [1, 16])
    decode_path: Literal["auto", "graph", "compile", "eager"] = doc(
        "How the decode step runs: auto is graph on CUDA and eager on CPU; compile is torch.compile "
        "(reduce-overhead on CUDA); a path that fails falls back to eager and says so.", "auto")
    decode_rounds: int = doc("Interleaved rounds of the decode measurement (each times every model gen_repeats "
                             "times).", 2)

    def validate(self) -> list[str]:
        """Every problem of the configuration, one string each (empty when valid)."""
        problems = []
        for m in self.models:
            if m not in MODEL_STAGES and m != "controls":
                problems.append(f"models: '{m}' is not a model stage; choose from {', '.join(MODEL_STAGES)}")
        if self.models and "pretrain" not in self.models:
            problems.append("models: must include 'pretrain' (the dense baseline of every comparison)")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            problems.append(f"batch_sizes: need one or more positive integers, got {self.batch_sizes}")
        if not self.seq_lens or any(s < 1 for s in self.seq_lens):
            problems.append(f"seq_lens: need one or more positive integers, got {self.seq_lens}")
        if not self.decode_batch_sizes or any(b < 1 for b in self.decode_batch_sizes):
            problems.append(f"decode_batch_sizes: need one or more positive integers, got {self.decode_batch_sizes}")
        for name in ("repeats", "gen_tokens", "gen_repeats", "val_batch_size", "decode_rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.max_spread > 0:
            problems.append(f"max_spread: must be positive, got {self.max_spread}")
        for name in ("warmup", "max_val_tokens", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.prompt and not self.prompt.strip():
            problems.append("prompt: must not be blank (leave it empty for the start of the validation text)")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("device: cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        if self.dtype == "fp16" and self.resolved_device() == "cpu":
            problems.append("dtype: fp16 matmuls on CPU are slow and not representative; use fp32 or bf16 on CPU")
        return problems

    def resolved_device(self) -> str:
        """``cuda`` or ``cpu``, with ``auto`` resolved."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        """The weight dtype of the speed measurements, with ``auto`` resolved."""
        if self.dtype == "auto":
            return torch.float16 if self.resolved_device() == "cuda" else torch.float32
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


# ---------------------------------------------------------------------------------------------
# finding the models


@dataclass
class ModelEntry:
    """One model to evaluate, as its stage's manifest describes it."""

    name: str  # dense | pruned | distilled
    stage: str  # pretrain | prune | distill
    stage_dir: Path
    model_dir: Path
    manifest: dict
    method: str | None  # prune method (magnitude | nm | structured) or None for the dense model
    masks: Path | None  # masks.safetensors that the weights must respect, if any


def find_models(run_dir: str | Path, models: list[str] | None = None) -> list[ModelEntry]:
    """The models of a run, found only through their stages' manifests, in pipeline order, then the finished
    compression controls of ``06_controls`` (:func:`pipeline.controls.control_entries`, stage ``controls``).

    Args:
        run_dir: ``results/<run>``.
        models: stages to evaluate (``controls``: every finished control); empty or ``None``: pretrain plus every
            other stage whose directory exists, and the controls.

    Raises:
        StageError: pretrain missing or incomplete; a requested stage missing; a stage directory that
            exists without a complete manifest (an interrupted run); a manifest naming a missing model
            directory.  Each message names the ``make`` target that makes the stage.
    """
    run_dir = Path(run_dir)
    wanted = list(models) if models else ["pretrain"] + [
        s for s in ("prune", "distill") if stage_dir(run_dir, s).exists()
    ]
    with_controls = not models or "controls" in models  # pipeline.controls: listed after the stages' models
    wanted = [s for s in wanted if s != "controls"]
    manifests = {s: require_stage(run_dir, s) for s in wanted}
    prune_manifest = manifests.get("prune")
    if prune_manifest is None and stage_dir(run_dir, "prune").exists():
        prune_manifest = require_stage(run_dir, "prune")
    entries = []
    for s in MODEL_STAGES:
        if s not in manifests:
            continue
        man = manifests[s]
        sdir = Path(man["_dir"])
        out = man.get("outputs", {})
        if "model_dir" not in out:
            raise StageError(f"{sdir}/manifest.json lists no outputs.model_dir; re-run `make {s}`")
        mdir = sdir / out["model_dir"]
        if not (mdir / "config.json").exists():
            raise StageError(f"{mdir} (outputs.model_dir of {sdir}) holds no config.json; re-run `make {s} --overwrite`")
        method, masks = None, None
        if s == "prune":
            method = out.get("method")
            masks = sdir / out["masks"] if out.get("masks") else None
        elif s == "distill":
            # the student inherits the pruning (method, masks) of the stage it was distilled from
            from_prune = "prune" in man.get("inputs", {})
            if out.get("masks"):
                method, masks = out.get("method"), sdir / out["masks"]
            elif from_prune and prune_manifest is not None:
                pout = prune_manifest.get("outputs", {})
                method = out.get("method", pout.get("method"))
                if pout.get("masks"):
                    masks = Path(prune_manifest["_dir"]) / pout["masks"]
            else:
                method = out.get("method")
        if masks is not None and not masks.exists():
            raise StageError(f"{masks} (the masks of {sdir}) does not exist; re-run `make prune --overwrite`")
        entries.append(ModelEntry(MODEL_STAGES[s], s, sdir, mdir, man, method, masks))
    if with_controls:
        from pipeline.controls import control_entries

        entries += control_entries(run_dir)
    return entries


# ---------------------------------------------------------------------------------------------
# quality


@torch.inference_mode()
def validation_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats/token) over ``tokens`` and its perplexity ``exp(loss)``.

    The same computation as the training stages' validation (:func:`pipeline.train.evaluate`, here with one
    rank): non-overlapping blocks of ``seq_len`` inputs (``pipeline.tokens.BlockDataset``), every token but the
    first predicted once, the mean taken over tokens, logits upcast to fp32.  The model runs on the device of its
    first parameter.

    Raises:
        ValueError: when ``tokens`` holds fewer than ``seq_len + 1`` tokens (not one block).
    """
    from pipeline.tokens import BlockDataset
    from pipeline.train import evaluate

    ds = BlockDataset(tokens, seq_len)
    if len(ds) == 0:
        raise ValueError(f"{len(tokens)} validation tokens make no block of seq_len={seq_len} + 1")
    loss, ppl, _ = evaluate(model, ds, batch_size, next(model.parameters()).device)
    return loss, ppl


# ---------------------------------------------------------------------------------------------
# size and sparsity


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers pruning acts on: ``nn.Linear`` (and GPT-2's ``Conv1D``) with 2-D weights,
    the output head excluded (tied to the embeddings in LLaMA; SparseGPT and Wanda leave it dense too).
    Keys are module names as in ``model.named_modules()``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - old transformers
        Conv1D = ()  # noqa: N806
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not out_emb and m.weight.dim() == 2
    }


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive weights along the input dimension has at most 2 non-zeros
    (NVIDIA's 2:4 semi-structured pattern; Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks").
    ``weight`` is ``(out_features, in_features)``; False when ``in_features`` is not a multiple of 4."""
    from pipeline.sparsity import check_nm

    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return check_nm(weight, 2, 4)


def size_stats(model: nn.Module, model_dir: str | Path, masks: str | Path | None = None) -> dict[str, Any]:
    """Parameter counts, sparsity and on-disk size of a model.

    Returns a dict with ``params`` (unique parameters, tied ones once), ``nonzero``, ``sparsity``
    (``1 - nonzero/params``), ``linear_params``/``linear_nonzero``/``linear_sparsity`` (over
    :func:`prunable_linears`), ``is_2_4`` (every prunable weight follows 2:4), ``size_bytes`` (sum of the
    model directory's ``*.safetensors`` files), ``sparse_size_bytes`` (the weights as a bitmask of
    ``numel/8`` bytes plus the non-zero values, for tensors with any zero; dense otherwise: the size a
    bitmap sparse format would take), and ``mask_violations`` (weights non-zero where ``masks`` says
    pruned; ``None`` without masks).

    Raises:
        StageError: when ``masks`` names a parameter the model lacks or a mask of another shape.
    """
    params = nonzero = sparse_bytes = 0
    for p in model.parameters():  # unique parameters: tied weights appear once
        n, nz = p.numel(), int(torch.count_nonzero(p).item())
        params += n
        nonzero += nz
        sparse_bytes += (nz * p.element_size() + math.ceil(n / 8)) if nz < n else n * p.element_size()
    lin = prunable_linears(model)
    lin_params = sum(m.weight.numel() for m in lin.values())
    lin_nonzero = sum(int(torch.count_nonzero(m.weight).item()) for m in lin.values())
    violations = None
    if masks is not None:
        from pipeline.sparsity import load_masks

        state = model.state_dict()
        violations = 0
        for name, mask in load_masks(masks).items():
            if name not in state or state[name].shape != mask.shape:
                raise StageError(f"{masks}: mask '{name}' {tuple(mask.shape)} matches no parameter of the model "
                                 f"in {model_dir}; the pruned model and its masks disagree, re-run `make prune`")
            violations += int(((state[name] != 0) & (mask.to(state[name].device) == 0)).sum().item())
    return {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params,
        "linear_params": lin_params,
        "linear_nonzero": lin_nonzero,
        "linear_sparsity": 1.0 - lin_nonzero / lin_params if lin_params else 0.0,
        "is_2_4": bool(lin) and all(is_2_4(m.weight) for m in lin.values()),
        "size_bytes": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")),
        "sparse_size_bytes": sparse_bytes,
        "mask_violations": violations,
    }


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int, device: str,
            reset: Callable[[], Any] | None = None) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn`` in milliseconds, after ``warmup`` untimed calls.

    CUDA: each call between two ``torch.cuda.Event`` records, read after one synchronize (device time
    of the work queued by the call, host overhead included when the GPU waits on the host).
    CPU: ``time.perf_counter`` around each call.  ``reset``, when given, runs before every call (warm-up
    ones included), outside the timed span: e.g. cropping a KV cache back so every decode step sees the
    same length.
    """
    reset = reset or (lambda: None)
    for _ in range(warmup):
        reset()
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            reset()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], None]:
    """Capture ``fn`` (static inputs, no host synchronisation inside) in a CUDA graph; return its replay.

    Follows the capture recipe of the PyTorch CUDA-graphs documentation: three warm-up calls on a side
    stream, then capture.  Raises whatever the capture raises (e.g. an op that synchronises)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _shape_key(batch: int, seq: int) -> str:
    return f"b{batch}_t{seq}"


@torch.inference_mode()
def forward_latency(model: nn.Module, vocab_size: int, batch_sizes: list[int], seq_lens: list[int],
                    warmup: int, repeats: int, graphs: bool = False, seed: int = 0) -> dict[str, dict]:
    """Forward latency of ``model`` (logits of every position, no KV cache) for each (batch, seq_len).

    Returns ``{"b<batch>_t<seq>": {"batch", "seq_len", "latency_ms", "latency_min_ms", "latency_max_ms",
    "tokens_per_s"}}``; with ``graphs``
    (CUDA only) also ``latency_graph_ms``/``tokens_per_s_graph`` from a CUDA-graph replay, or
    ``graph_error`` when the capture failed.  Latency is the median over ``repeats``; tokens/s is
    ``batch * seq_len / latency``.  Inputs are uniform random token ids from a fixed ``seed``.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for b in batch_sizes:
        for t in seq_lens:
            ids = torch.randint(0, vocab_size, (b, t), generator=gen).to(device)
            times = time_ms(partial(model, input_ids=ids, use_cache=False), warmup, repeats, device.type)
            ms = statistics.median(times)
            row = {"batch": b, "seq_len": t, "latency_ms": ms, "latency_min_ms": min(times),
                   "latency_max_ms": max(times), "tokens_per_s": b * t / (ms / 1e3)}
            if graphs and device.type == "cuda":
                try:
                    replay = cuda_graph(partial(model, input_ids=ids, use_cache=False))
                    gms = statistics.median(time_ms(replay, warmup, repeats, "cuda"))
                    row.update(latency_graph_ms=gms, tokens_per_s_graph=b * t / (gms / 1e3))
                except Exception as e:  # noqa: BLE001 - recorded in the results, never hidden
                    row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            out[_shape_key(b, t)] = row
    return out


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int) -> tuple[str, torch.Tensor]:
    """Greedy continuation of ``prompt`` by exactly ``new_tokens`` tokens (EOS does not stop it), KV cache on.

    Returns the decoded continuation (prompt excluded) and the generated ids ``(1, prompt + new_tokens)``."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=pad)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), ids


def generation_speed(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int, repeats: int) -> float:
    """Greedy generation speed in new tokens/s at batch 1 (prompt prefill included), median of
    ``repeats`` generations after one untimed one."""
    device = next(model.parameters()).device.type
    ms = statistics.median(time_ms(lambda: generate(model, tokenizer, prompt, new_tokens), 1, repeats, device))
    return new_tokens / (ms / 1e3)


def decode_speed(entries: list[ModelEntry], cfg: EvalConfig, tokenizer: Any) -> dict[str, dict[str, dict]]:
    """Greedy decoding speed of every model as a server runs it (:func:`pipeline.decode.measure_decode`):
    all models loaded at once in the measurement dtype (dense weights, also for 2:4 models: the sparse kernel
    loses at decode's few tokens per matmul), the prompt ``cfg.prompt`` repeated to each of
    ``cfg.decode_batch_sizes``, ``cfg.gen_tokens`` new tokens, ``cfg.decode_rounds`` interleaved rounds of
    ``cfg.gen_repeats`` timed generations each.  Returns ``{model name: {"b<batch>": row}}``, each row with
    ``path`` (``graph``/``compile``/``eager``), ``ttft_ms``, ``ms_per_token``, ``tok_s`` and the speed-ups
    against ``dense``."""
    from transformers import AutoModelForCausalLM

    from pipeline.decode import measure_decode

    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    models = {e.name: AutoModelForCausalLM.from_pretrained(e.model_dir, dtype=dtype).to(device).eval()
              for e in entries}
    prompt = tokenizer(cfg.prompt, return_tensors="pt")["input_ids"].to(device)
    try:
        return measure_decode(models, prompt, cfg.decode_batch_sizes, cfg.gen_tokens, warmup=1,
                              repeats=cfg.gen_repeats, path=cfg.decode_path, rounds=cfg.decode_rounds,
                              baseline="dense", max_spread=cfg.max_spread)
    finally:
        del models
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 2:4 semi-structured sparsity (CUDA)


def _contiguous_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def _contiguous_if_strided(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """The output unchanged when its last dimension is dense (stride 1: what SDPA's fused kernels and
    coalesced elementwise kernels want), else a contiguous copy."""
    return output if output.stride(-1) == 1 else output.contiguous()


#: the options of :func:`to_semi_structured` that stage 05 uses (``scripts/bench_sparse.py`` times the others)
#: stage 05's conversion: the cb49447 one (every sparse output copied to contiguous memory). The fused-transpose
#: variant measured far slower on the H200 (``results/bench/NOTES.md``, 2026-12-03), so it stays opt-in.
SEMI_STRUCTURED_DEFAULTS: dict[str, Any] = {"fuse_transpose": False, "contiguous": "all", "fuse_projections": False}


class FusedProjections(nn.Module):
    """One matmul for sibling linear layers that read the same input (q/k/v, gate/up): the weights concatenated
    along the output dimension, the output split back.  The siblings become :class:`FusedProjectionPart`
    modules; the first one called computes every part and the others return theirs (the attention and MLP
    forwards call them in order on the same tensor; any other input is computed alone, so results are always
    right).  ``weight`` is ``(sum of out_features, in_features)``."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fused projections need a bias on every part or on none")
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
                     if all(has_bias) else None)
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0 or x is not self._input:
            self._parts = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input = x
        out = self._parts[i]
        if i == len(self.sizes) - 1:
            self._input, self._parts = None, ()  # hold no activation after the last part
        return out


class FusedProjectionPart(nn.Module):
    """Part ``index`` of a :class:`FusedProjections` (which it does not register: its owner does)."""

    def __init__(self, fused: FusedProjections, index: int, in_features: int, out_features: int):
        super().__init__()
        self._fused = [fused]  # a list, so that the shared module is not registered twice
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(self.index, x)


@torch.inference_mode()
def fuse_sibling_projections(model: nn.Module, eligible: Callable[[nn.Linear], bool] = lambda m: True,
                             convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             hook_for: Callable[[str], Any] | None = None) -> list[str]:
    """Fuse, in every block, each group of sibling projections that :mod:`pipeline.architectures` lists as
    ``fusable`` for the model (LLaMA: q/k/v and gate/up) into a :class:`FusedProjections`, registered beside them
    under the group's name (``qkv_fused`` / ``gate_up_fused``); each sibling becomes a
    :class:`FusedProjectionPart`.  A group is fused when every sibling is an ``nn.Linear`` of
    :func:`prunable_linears` passing ``eligible`` and all share the input width.  ``convert`` turns the
    concatenated weight into the one used (e.g. a sparse tensor); ``hook_for(name)``, when it returns a hook,
    is registered as the forward hook of that part.  Returns the names of the fused siblings.

    Raises:
        KeyError: an architecture missing from :mod:`pipeline.architectures`.
    """
    from pipeline import architectures

    arch = architectures.of(model)
    blocks_name, blocks = arch.blocks_of(model)
    lin = prunable_linears(model)
    fused_names: list[str] = []
    for b, block in enumerate(blocks):
        for fused_name, group in arch.fusable:
            parent_path = group[0].rpartition(".")[0]
            parent_name = f"{blocks_name}.{b}.{parent_path}" if parent_path else f"{blocks_name}.{b}"
            parent = block.get_submodule(parent_path) if parent_path else block
            names = [f"{blocks_name}.{b}.{g}" for g in group]
            parts = [lin.get(n) for n in names]
            if not all(isinstance(m, nn.Linear) and eligible(m) for m in parts):
                continue
            if len({m.in_features for m in parts}) != 1:
                continue
            fused = FusedProjections(parts)
            if convert is not None:
                try:
                    fused.weight = nn.Parameter(convert(fused.weight.detach()), requires_grad=False)
                except Exception as e:  # noqa: BLE001 - this group stays unfused, the caller converts its layers
                    leaves = "/".join(g.rpartition(".")[2] for g in group)
                    print(f"fuse_sibling_projections: {parent_name} {leaves} left unfused: "
                          f"{type(e).__name__}: {e}"[:300], flush=True)
                    continue
            parent.add_module(fused_name, fused)
            for i, (n, g, m) in enumerate(zip(names, group, parts)):
                part = FusedProjectionPart(fused, i, m.in_features, m.out_features)
                hook = hook_for(n) if hook_for is not None else None
                if hook is not None:
                    part.register_forward_hook(hook)
                arch.replace(block, g, part)
                fused_names.append(n)
    return fused_names


def to_semi_structured(model: nn.Module, fuse_transpose: bool = False, contiguous: str = "all",
                       fuse_projections: bool = False, alg_search_tokens: int = 0) -> tuple[list[str], dict[str, str]]:
    """Replace the weight of every prunable linear layer that follows 2:4 by
    ``torch.sparse.to_sparse_semi_structured(weight)`` (in place; fp16/bf16 CUDA weights).  The output head
    stays dense (it is not a prunable linear).

    The sparse matmul computes ``(W X^T)^T``: without ``fuse_transpose`` (PyTorch <= 2.11) it returns its
    result transposed (column-major), and ``scaled_dot_product_attention`` refuses its fused (flash /
    memory-efficient) kernels for q/k/v whose last dimension is strided and falls back to the fp32 math
    kernel: seen on an H200 (PyTorch 2.11), where that fallback, not the linear layers, made a 2:4 model
    slower than dense (``results/bench/NOTES.md``).  So converted layers get a forward hook, by ``contiguous``:

    - ``all``: every output copied to contiguous memory (the copy is part of every 2:4 timing);
    - ``auto``: copied only when its last dimension is strided (none with ``fuse_transpose``, whose output is
      already row-major);
    - ``attention``: only the q/k/v outputs (when strided); the MLP and output projections pass their
      transposed result on, and the next sparse matmul reads it as the transposed operand it wants anyway.

    ``fuse_projections``: q/k/v and gate/up (the architecture's ``fusable`` groups) become one sparse matmul each
    (:class:`FusedProjections`), when every sibling is 2:4 and they share the input width.
    ``alg_search_tokens``: see :func:`pipeline.compat.torch_compat.semi_structured_weight`.

    Returns the converted layer names (fused ones included, under their own names) and ``{layer: reason}`` for
    each layer left dense (not 2:4, or refused by the kernel, e.g. a shape it does not support).

    Raises:
        ValueError: an unknown ``contiguous``.
    """
    if contiguous not in ("all", "auto", "attention"):
        raise ValueError(f"contiguous must be all, auto or attention, got {contiguous!r}")
    from pipeline import architectures

    arch = architectures.find(model)
    # the q/k/v projections' paths inside a block (``self_attn.q_proj``; any block's name ends with one)
    attn_paths = {arch.q, arch.k, arch.v} if arch is not None else set()

    def hook_for(name: str):
        if contiguous == "all":
            return _contiguous_output
        if contiguous == "attention" and not any(name.endswith("." + p) for p in attn_paths):
            return None
        return _contiguous_if_strided

    converted, skipped = [], {}
    lin = prunable_linears(model)
    done: set[str] = set()
    if fuse_projections:
        try:
            done = set(fuse_sibling_projections(
                model, eligible=lambda m: is_2_4(m.weight),
                convert=partial(semi_structured_weight, fuse_transpose=fuse_transpose, alg_search_tokens=alg_search_tokens),
                hook_for=hook_for))
        except Exception as e:  # noqa: BLE001 - the layers are then converted one by one below
            print(f"to_semi_structured: projections left unfused ({type(e).__name__}: {e})"[:300], flush=True)
        converted += sorted(done)
    for name, mod in lin.items():
        if name in done:
            continue
        if not isinstance(mod, nn.Linear):
            skipped[name] = "not nn.Linear"
            continue
        if not is_2_4(mod.weight):
            skipped[name] = "weights do not follow the 2:4 pattern"
            continue
        try:
            mod.weight = nn.Parameter(semi_structured_weight(mod.weight.detach(), fuse_transpose, alg_search_tokens),
                                      requires_grad=False)
            hook = hook_for(name)
            if hook is not None:
                mod.register_forward_hook(hook)
            converted.append(name)
            skipped.pop(name, None)
        except Exception as e:  # noqa: BLE001 - the kernel's refusal is the reason we report
            skipped[name] = f"{type(e).__name__}: {e}"[:200]
    return converted, skipped


@torch.inference_mode()
def linear_shape_bench(shapes: list[tuple[int, int]], token_counts: list[int], dtype: torch.dtype,
                       warmup: int, repeats: int, seed: int = 0) -> list[dict]:
    """Dense against 2:4 ``F.linear`` for each weight shape ``(out, in)`` and number of tokens, both
    captured in CUDA graphs (and eager), so that the per-call host cost of the sparse kernel is visible
    and separable.  Returns rows ``{"out", "in", "tokens", "dense_ms", "sparse_ms", "speedup",
    "dense_graph_ms", "sparse_graph_ms", "speedup_graph"}`` (``error`` instead when a kernel refuses)."""
    from torch.sparse import to_sparse_semi_structured

    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen)
        w = w * torch.tensor([1, 1, 0, 0], device="cuda", dtype=dtype).repeat(out_f, in_f // 4)  # 2:4 mask
        for n in token_counts:
            x = torch.randn(n, in_f, device="cuda", dtype=dtype, generator=gen)
            row: dict[str, Any] = {"out": out_f, "in": in_f, "tokens": n}
            try:
                ws = to_sparse_semi_structured(w)
                dense = partial(torch.nn.functional.linear, x, w)
                sparse = partial(torch.nn.functional.linear, x, ws)
                row["dense_ms"] = statistics.median(time_ms(dense, warmup, repeats, "cuda"))
                row["sparse_ms"] = statistics.median(time_ms(sparse, warmup, repeats, "cuda"))
                row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                row["dense_graph_ms"] = statistics.median(time_ms(cuda_graph(dense), warmup, repeats, "cuda"))
                row["sparse_graph_ms"] = statistics.median(time_ms(cuda_graph(sparse), warmup, repeats, "cuda"))
                row["speedup_graph"] = row["dense_graph_ms"] / row["sparse_graph_ms"]
            except Exception as e:  # noqa: BLE001 - reported per shape
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the check of every input, before anything is written


def check_inputs(cfg: EvalConfig, entries: list[ModelEntry], data_manifest: dict, prompt_tokens: int) -> None:
    """Refuse, before anything is written, measurements the models cannot make.

    Args:
        prompt_tokens: length of ``cfg.prompt`` in tokens of the run's tokenizer.

    Raises:
        ConfigError: a sequence length (latency, validation, or prompt plus generated tokens) beyond a
            model's ``max_position_embeddings``, or a data vocabulary larger than a model's.
    """
    from transformers import AutoConfig

    problems = []
    vocab = int(data_manifest["outputs"]["vocab_size"])
    data_seq = int(data_manifest["outputs"]["seq_len"])
    for e in entries:
        mc = AutoConfig.from_pretrained(e.model_dir)
        max_pos = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
        if max_pos is not None:
            too_long = [t for t in cfg.seq_lens if t > max_pos]
            if too_long:
                problems.append(f"seq_lens {too_long} exceed the {e.name} model's max_position_embeddings "
                                f"{max_pos} ({e.model_dir}); pass --seq_lens of at most {max_pos}")
            if data_seq > max_pos:
                problems.append(f"the data's seq_len {data_seq} exceeds the {e.name} model's {max_pos} positions; "
                                f"the model was not trained on this run's data: re-run `make {e.stage}`")
            if prompt_tokens + cfg.gen_tokens > max_pos:
                problems.append(f"prompt ({prompt_tokens} tokens) plus gen_tokens {cfg.gen_tokens} exceed the "
                                f"{e.name} model's {max_pos} positions; pass a smaller --gen_tokens or --prompt")
        if getattr(mc, "vocab_size", vocab) < vocab:
            problems.append(f"the {e.name} model's vocab_size {mc.vocab_size} is smaller than the data's {vocab}; "
                            f"it was not trained on this run's tokens: re-run `make {e.stage}`")
    if problems:
        raise ConfigError(problems)


def measure_sparse_24(model: nn.Module, vocab_size: int, cfg: EvalConfig, tokenizer: Any,
                      dense_latency: dict[str, dict]) -> dict[str, Any]:
    """Time a 2:4 model with semi-structured sparse weights against the same model dense (CUDA only).

    ``model`` must hold fp16/bf16 CUDA weights and be already timed dense (``dense_latency``, from
    :func:`forward_latency` with ``graphs=True``); it is converted in place by :func:`to_semi_structured`.
    Returns ``converted``/``skipped`` layers, ``max_abs_logit_diff`` (sparse against dense on one batch,
    a correctness check), ``latency`` per shape with ``speedup`` (eager) and ``speedup_graph`` (both
    captured in CUDA graphs) against the dense figures, ``gen_tokens_per_s``, and ``linear_shapes``:
    :func:`linear_shape_bench` over the converted layers' weight shapes at each batch x seq_len tokens.
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, min(cfg.seq_lens)), generator=torch.Generator().manual_seed(cfg.seed))
    ids = ids.to(device)
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    converted, skipped = to_semi_structured(model, **SEMI_STRUCTURED_DEFAULTS)
    result: dict[str, Any] = {"converted": converted, "skipped": skipped,
                              "options": dict(SEMI_STRUCTURED_DEFAULTS)}
    if not converted:
        return result
    with torch.inference_mode():
        result["max_abs_logit_diff"] = float((model(input_ids=ids, use_cache=False).logits.float() - ref).abs().max())
    lat = forward_latency(model, vocab_size, cfg.batch_sizes, cfg.seq_lens, cfg.warmup, cfg.repeats,
                          graphs=cfg.cuda_graphs, seed=cfg.seed)
    for key, row in lat.items():
        d = dense_latency[key]
        row["dense_latency_ms"] = d["latency_ms"]
        row["speedup"] = d["latency_ms"] / row["latency_ms"]
        if "latency_graph_ms" in row and "latency_graph_ms" in d:
            row["dense_latency_graph_ms"] = d["latency_graph_ms"]
            row["speedup_graph"] = d["latency_graph_ms"] / row["latency_graph_ms"]
    result["latency"] = lat
    result["gen_tokens_per_s"] = generation_speed(model, tokenizer, cfg.prompt, cfg.gen_tokens, cfg.gen_repeats)
    mods = dict(model.named_modules())
    shapes = sorted({(mods[n].out_features, mods[n].in_features) for n in converted})
    tokens = sorted({b * t for b in cfg.batch_sizes for t in cfg.seq_lens})
    result["linear_shapes"] = linear_shape_bench(shapes, tokens, next(model.parameters()).dtype,
                                                 cfg.warmup, cfg.repeats, cfg.seed)
    return result


def speedups(results: dict[str, dict], baseline: str = "dense") -> None:
    """Add, in place, each model's speed and change against ``baseline`` measured in the same run:
    per shape ``speedup`` (= baseline latency / model latency) and ``speedup_graph``; and
    ``rel_ppl``, ``rel_nonzero``, ``rel_size`` (model / baseline - 1), ``gen_speedup``."""
    base = results[baseline]
    for row in results.values():
        for key, lat in row["latency"].items():
            b = base["latency"][key]
            lat["speedup"] = b["latency_ms"] / lat["latency_ms"]
            if "latency_graph_ms" in lat and "latency_graph_ms" in b:
                lat["speedup_graph"] = b["latency_graph_ms"] / lat["latency_graph_ms"]
        row["rel_ppl"] = row["val_ppl"] / base["val_ppl"] - 1
        row["rel_nonzero"] = row["nonzero"] / base["nonzero"] - 1
        row["rel_size"] = row["size_bytes"] / base["size_bytes"] - 1 if base["size_bytes"] else None
        row["gen_speedup"] = row["gen_tokens_per_s"] / base["gen_tokens_per_s"]


def scalars(name: str, row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars ``eval/<name>/<metric>`` (per-shape ones as ``.../<metric>/b<B>_t<T>``)
    of one model's result row."""
    out = {}
    # the two sparsities under names that cannot be confused: zeros among the prunable linear weights, and
    # zeros among all parameters (embeddings and norms included)
    tag = {"sparsity": "sparsity_all_params", "linear_sparsity": "sparsity_linear_weights"}
    for k in ("val_loss", "val_ppl", "params", "nonzero", "sparsity", "linear_sparsity", "size_bytes",
              "sparse_size_bytes", "gen_tokens_per_s", "gen_speedup", "rel_ppl"):
        if row.get(k) is not None:
            out[f"eval/{name}/{tag.get(k, k)}"] = float(row[k])
    for key, lat in row["latency"].items():
        for k in ("latency_ms", "tokens_per_s", "speedup", "latency_graph_ms", "speedup_graph"):
            if k in lat:
                out[f"eval/{name}/{k}/{key}"] = float(lat[k])
    for key, d in (row.get("decode") or {}).items():
        for k in ("ttft_ms", "ms_per_token", "tok_s", "speedup_tok_s", "speedup_ttft"):
            if d.get(k) is not None:
                out[f"eval/{name}/decode_{k}/{key}"] = float(d[k])
    for key, lat in (row.get("sparse_24") or {}).get("latency", {}).items():
        for k in ("latency_ms", "speedup", "latency_graph_ms", "speedup_graph"):
            if k in lat:
                out[f"eval/{name}/sparse24_{k}/{key}"] = float(lat[k])
    return out
