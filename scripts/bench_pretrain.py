"""Pretraining throughput: this project's engine (DeepSpeed ZeRO-1/2/3, fp16/bf16) against a plain PyTorch
baseline (DDP + ``torch.compile`` + bf16 autocast + fused AdamW), same model, micro-batch and sequence length,
same GPUs, one run.

    python scripts/bench_pretrain.py --gpus 1,2 [--preset 124m] [--configs baseline,zero2_fp16,...]
    python scripts/bench_pretrain.py --gpus 1 --configs "baseline,zero2_fp16,zero2_fp16+eager+noforeach"

A configuration is ``baseline`` or a DeepSpeed template of ``ds_configs/`` followed by ``+option``s:

- (none): the engine exactly as ``scripts/pretrain.py`` builds it, with the product's defaults
  (``--compile auto``, multi-tensor overflow/norm checks);
- ``+eager`` / ``+compile``: force the model (and loss) eager or compiled;
- ``+noforeach``: DeepSpeed's own per-tensor overflow and gradient-norm loops;
- ``+nodefer``: DeepSpeed's own ZeRO-1/2 fp16 step, which reads the overflow flag before launching the update
  (the product defers that read to the next backward: ``pipeline.compat.fp16_step``);
- ``+bucket=N``: ZeRO ``reduce_bucket_size`` N elements, and for ZeRO-1/2 ``allgather_bucket_size`` too;
- ``+nooverlap``: ZeRO ``overlap_comm`` false;
- ``+deepcompile``: DeepSpeed's DeepCompile (``"compile": {"deepcompile": true}``), compiled;
- ``+nodeepcompile``: DeepCompile off (``zero3_fp16`` turns it on) and, by the product's policy, ZeRO-3 eager;
- ``+noreducescatter``: ZeRO-1/2 ``reduce_scatter`` false (one all-reduce of each bucket);
- ``+leaf``: ZeRO-3 ``leaf_module.classes`` = the decoder-layer classes (:data:`LEAF_CLASSES`): each layer is
  gathered and released as one unit, with one set of hooks, instead of per linear layer;
- ``+prefetch=N`` / ``+persist=N``: ZeRO-3 ``stage3_prefetch_bucket_size`` / ``stage3_param_persistence_threshold``;
- ``+timers``: DeepSpeed's synchronised throughput timer on (its default; the templates turn it off);
- ``+bf16``: the template's precision switched to bf16 (fp16 off);
- ``+syncnorm``: read the gradient norm back after every step (a host synchronisation), as the training loop
  did before it read it on logged steps only;
- ``+mb=N``: micro-batch N instead of the preset's (also valid for ``baseline``);
- ``+preset=NAME``: another preset's model (e.g. ``350m``) (also valid for ``baseline``);
- ``+profile``: after timing, profile 3 steps with ``torch.profiler`` (top kernels and host ops, GPU busy share);
- ``+trace``: after timing, record 2 steps with ``torch.profiler`` (Python stacks on) and write the Chrome trace
  ``<out>/trace-<job tag>.json.gz`` of rank 0 (open it in Perfetto or ``chrome://tracing``);
- ``+syncs``: after timing, run 3 steps with PyTorch's CUDA sync debug mode and count every host synchronisation
  per step by its call site (``.item()``, blocking copies, ``torch.cuda.synchronize``, stream and event waits):
  each one drains the GPU's queue and exposes the host time that follows.  A site is the innermost frames outside
  ``torch`` and this script, so a synchronisation in the benchmark's own step shows an empty site.

The driver launches one ``torchrun`` job per (configuration, GPU count).  With ``--parallel`` the one-GPU jobs run
side by side, one per visible GPU (``CUDA_VISIBLE_DEVICES``), and ``baseline`` is measured on every GPU so each
one-GPU row is compared with the baseline *of its own GPU*.  Each job runs ``--warmup`` untimed optimizer steps
(compilation and JIT builds fall there), then ``--steps`` steps in ``--windows`` equal windows, synchronising the
device only at window edges (a per-step synchronisation would stop the host from queueing ahead, which only the
baseline would lose); the figure is the median window's mean step time.  The engine's timed step is the product
loop's: loss, ``backward``, ``step`` and ``engine.last_step()`` (the applied flag and loss scale; the gradient
norm stays on the device, as ``pipeline.train.run_training`` reads it on logged steps only; ``+syncnorm`` reads
it every step).

Figures per GPU: tokens/s, TFLOP/s (6N + 12·L·d·T FLOPs per token, PaLM appendix B, as nanoGPT's MFU), MFU
against the bf16 matrix-multiply peak measured at the start with an 8192³ matmul (median of 30), peak memory;
the ratio to the baseline (same GPU count, same GPU with ``--parallel``) and the weak-scaling efficiency
(tokens/s per GPU at n GPUs over one GPU, same configuration).  Output: a table on stdout,
``<out>/pretrain-<time>.json`` and, with ``+profile`` rows, ``<out>/profiles-<time>.txt``.

``--device cpu`` is a smoke mode for this machine's tests (gloo, ``DS_ACCELERATOR=cpu``, bf16 and fp32 only, no
compile; pass ``--preset tiny``): it checks the script, not the hardware.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPTIONS = ("eager", "compile", "noforeach", "nodefer", "bucket", "nooverlap", "deepcompile", "nodeepcompile",
           "noreducescatter", "leaf", "prefetch", "persist", "timers", "bf16", "syncnorm", "mb", "preset", "profile",
           "syncs", "trace")
NUMERIC = ("bucket", "mb", "prefetch", "persist")
#: decoder-layer classes that ``+leaf`` makes ZeRO-3 leaf modules (classes absent from the model are ignored)
LEAF_CLASSES = ["transformers.models.llama.modeling_llama.LlamaDecoderLayer",
                "transformers.models.gpt2.modeling_gpt2.GPT2Block"]


def parse_config(spec: str) -> tuple[str, dict]:
    """``zero2_fp16+bucket=5e8+eager`` -> (``zero2_fp16``, {"bucket": 5e8, "eager": True}).

    Raises:
        ValueError: unknown template or option (named in the message).
    """
    base, *opts = spec.split("+")
    if base != "baseline" and not (ROOT / "ds_configs" / f"{base}.json").is_file():
        raise ValueError(f"unknown configuration '{base}' in '{spec}': use 'baseline' or a ds_configs/*.json name")
    out: dict = {}
    for o in opts:
        key, _, val = o.partition("=")
        if key not in OPTIONS:
            raise ValueError(f"unknown option '+{key}' in '{spec}'; options: {', '.join(OPTIONS)}")
        if key in NUMERIC:
            out[key] = int(float(val))
        elif key == "preset":
            out[key] = val
        else:
            out[key] = True
    if base == "baseline" and set(out) - {"mb", "preset", "profile", "syncs", "trace"}:
        raise ValueError(f"'{spec}': the baseline takes only +mb, +preset, +profile, +syncs and +trace")
    return base, out


def measure_peak_tflops(n: int = 8192, iters: int = 30) -> float:
    """bf16 dense matmul rate of this GPU in TFLOP/s (2·n³ FLOPs per product; median of ``iters``)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def _profiled(step, batches, device: str, n_steps: int, with_stack: bool = False):
    """Run ``n_steps`` steps under ``torch.profiler`` (CPU, and CUDA on a GPU); returns the profiler and the
    wall time in seconds, the device synchronised at both ends."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts, with_stack=with_stack) as prof:
        for i in range(n_steps):
            step(batches[i % len(batches)])
        sync()
    return prof, time.perf_counter() - t0


def _profile(step, batches, device: str) -> str:
    """Top ops of 3 profiled steps, and the share of wall time the GPU was busy running kernels."""
    prof, wall = _profiled(step, batches, device, 3)
    ka = prof.key_averages()
    lines = []
    if device == "cuda":
        # kernels only: user annotations on the GPU timeline (DistributedDataParallel.forward, Optimizer.step#...)
        # also carry device time and would count it twice
        kernel_us = sum(e.self_device_time_total for e in ka
                        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False))
        lines.append(f"GPU busy {kernel_us / 1e6 / wall:.1%} of {wall * 1e3 / 3:.1f} ms per step (kernel time summed)")
        lines.append(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    return "\n".join(lines)


def _trace(step, batches, device: str, path: Path | None) -> None:
    """Record 2 steps with ``torch.profiler`` (CPU, CUDA, Python stacks) into the gzipped Chrome trace ``path``
    (every rank steps; ranks given ``None`` write nothing)."""
    import gzip
    import shutil

    prof, _ = _profiled(step, batches, device, 2, with_stack=True)
    if path is None:
        return
    raw = path.with_suffix("")  # .json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def _sync_sites(step, batches, n_steps: int = 3) -> dict:
    """Host synchronisations per step by call site, over ``n_steps`` steps on CUDA.

    PyTorch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns at every implicit
    synchronisation (``.item()``, ``bool()`` of a device tensor, a blocking device-to-host copy, a stream
    synchronisation inside an op); explicit ``torch.cuda.synchronize`` and ``Stream``/``Event.synchronize``
    calls are counted by wrapping them for the duration (once each: ``Stream.synchronize`` also warns).  A site
    is the innermost three frames outside ``torch`` and this script (file:line function), so DeepSpeed's and this
    project's lines show.  Returns
    ``{"per_step": float, "sites": [[count_per_step, site], ...]}`` (most frequent first)."""
    import collections
    import traceback
    import warnings

    import torch

    counts: collections.Counter = collections.Counter()
    torch_dir = str(Path(torch.__file__).parent)

    inside = [0]  # depth of wrapped explicit calls: the sync they make themselves is already counted

    def site() -> str:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if not f.filename.startswith(torch_dir) and not f.filename.endswith("warnings.py")
                  and not f.filename.endswith("bench_pretrain.py")]
        return " < ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames[-3:][::-1])

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("called a synchronizing CUDA operation"):
            if not inside[0]:  # Stream.synchronize also warns: count it once, under its wrapper's label
                counts[site()] += 1
        else:
            orig_show(message, category, filename, lineno, file, line)

    def counted(fn, label):
        def wrapper(*a, **k):
            if not inside[0]:
                counts[f"[{label}] " + site()] += 1
            inside[0] += 1
            try:
                return fn(*a, **k)
            finally:
                inside[0] -= 1
        return wrapper

    patched = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")]
    saved = [getattr(obj, name) for obj, name in patched]
    orig_show = warnings.showwarning
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            for (obj, name), fn in zip(patched, saved):
                setattr(obj, name, counted(fn, f"{getattr(obj, '__name__', 'cuda')}.{name}"))
            torch.cuda.set_sync_debug_mode("warn")
            for i in range(n_steps):
                step(batches[i % len(batches)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
            for (obj, name), fn in zip(patched, saved):
                setattr(obj, name, fn)
            warnings.showwarning = orig_show
    torch.cuda.synchronize()
    total = sum(counts.values())
    return dict(per_step=total / n_steps, sites=[[c / n_steps, s] for s, c in counts.most_common()])


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as tdist

    from pipeline.config import parse_cli
    from pipeline.model import build_model, count_params, flops_per_token
    from pipeline.train import TrainConfig, causal_lm_loss, compiled_token_cross_entropy, token_cross_entropy

    template, opts = parse_config(args.config)
    preset = opts.get("preset", args.preset)
    cfg = parse_cli(TrainConfig, ["--preset", preset], "pretrain", validate=False)
    cuda = args.device == "cuda"
    seq = args.seq_len
    mb = opts.get("mb") or args.micro_batch or cfg.micro_batch_size
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = build_model(cfg.model, args.vocab, seq, seed=cfg.seed)
    n_params = count_params(model)
    fpt = flops_per_token(n_params, cfg.model.n_layer, cfg.model.d_model, seq)
    info: dict = {}

    if template == "baseline":  # plain PyTorch, as a careful user writes it (nanoGPT-style)
        tdist.init_process_group("nccl" if cuda else "gloo")
        world = tdist.get_world_size()
        precision = "bf16"
        model = model.to(dev)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None,
                                                        gradient_as_bucket_view=True)
        cmodel = torch.compile(ddp) if cuda else ddp
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                fused=cuda)
        ce = compiled_token_cross_entropy if cuda else token_cross_entropy
        info.update(compiled=cuda)

        def outcome() -> dict:
            return {}

        def step(batch):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                x, y = batch[:, :-1], batch[:, 1:]
                logits = cmodel(input_ids=x).logits
            loss = ce(logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:  # this project's engine, built as scripts/pretrain.py builds it
        from pipeline.ds_config import load_template
        from pipeline.engine import device_type, init_distributed
        from pipeline.train import build_training_engine, resolve_run_ds_config

        launcher = init_distributed()
        world = tdist.get_world_size()
        tpl, _ = load_template(ROOT / "ds_configs" / f"{template}.json")
        zo = tpl.setdefault("zero_optimization", {})
        if "bucket" in opts:
            zo["reduce_bucket_size"] = opts["bucket"]
            if zo.get("stage", 0) < 3:
                zo["allgather_bucket_size"] = opts["bucket"]
        if opts.get("nooverlap"):
            zo["overlap_comm"] = False
        if opts.get("deepcompile") or opts.get("nodeepcompile"):
            tpl["compile"] = {"deepcompile": bool(opts.get("deepcompile"))}
        if opts.get("noreducescatter"):
            zo["reduce_scatter"] = False
        if opts.get("leaf"):
            zo["leaf_module"] = {"classes": LEAF_CLASSES}
        if "prefetch" in opts:
            zo["stage3_prefetch_bucket_size"] = opts["prefetch"]
        if "persist" in opts:
            zo["stage3_param_persistence_threshold"] = opts["persist"]
        if opts.get("timers"):
            tpl["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
        precision = "bf16" if tpl.get("bf16", {}).get("enabled") or opts.get("bf16") else "fp16" if tpl.get(
            "fp16", {}).get("enabled") else "fp32"
        if not cuda and precision == "fp16":
            raise SystemExit(f"{args.config}: fp16 does not run on DeepSpeed's CPU accelerator")
        cfg.micro_batch_size, cfg.grad_accum = mb, 1
        cfg.foreach_checks = not opts.get("noforeach")
        cfg.defer_overflow = not opts.get("nodefer")
        cfg.compile = "on" if (opts.get("compile") or opts.get("deepcompile")) else "off" if opts.get("eager") else "auto"
        dsc = resolve_run_ds_config(cfg, tpl, world, precision)
        engine, why = build_training_engine(model, cfg, dsc, precision, lambda s: 1.0, launcher, device_type())
        info.update(compiled=engine.compiled, compile_policy=why, foreach_checks=engine.foreach_checks,
                    deferred_overflow=engine.deferred is not None, zero_optimization=dsc.get("zero_optimization"))

        sync_norm = bool(opts.get("syncnorm"))

        def outcome() -> dict:  # fp16 skips change what a step costs: every row says how many there were
            d = engine.deferred
            return dict(skipped_steps=engine.skipped_steps, loss_scale=engine.loss_scale(),
                        deferred_reads=d.host_reads if d else None, deferred_waits=d.waits if d else None)

        def step(batch):
            loss, _ = causal_lm_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            res = engine.last_step()  # what the training loop reads back after every optimizer step
            if sync_norm:
                res.grad_norm  # noqa: B018 - the device read (a host synchronisation) is what is measured
            return loss

    g = torch.Generator(device="cpu").manual_seed(1234 + tdist.get_rank())
    batches = [torch.randint(0, args.vocab, (mb, seq + 1), generator=g).to(dev) for _ in range(4)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    for i in range(args.warmup):
        loss = step(batches[i % len(batches)])
    sync()
    warm_s = time.perf_counter() - t_warm
    per_window = max(1, args.steps // args.windows)
    windows = []
    for w in range(args.windows):
        sync()
        t0 = time.perf_counter()
        for i in range(per_window):
            loss = step(batches[(w * per_window + i) % len(batches)])
        sync()
        windows.append((time.perf_counter() - t0) / per_window)
    dt = statistics.median(windows)
    tok_per_gpu = mb * seq / dt
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    mems = [None] * world
    tdist.all_gather_object(mems, peak_mem)  # every rank must call it
    prof = None
    if opts.get("profile"):
        text = _profile(step, batches, args.device)  # every rank steps; rank 0 keeps the table
        prof = text if tdist.get_rank() == 0 else None
    if opts.get("trace"):
        out = Path(args.out)  # <out>/.row-<tag>.json -> <out>/trace-<tag>.json.gz
        _trace(step, batches, args.device,  # every rank steps; rank 0 writes
               out.with_name(f"trace-{out.stem.removeprefix('.row-')}.json.gz") if tdist.get_rank() == 0 else None)
    syncs = None
    if opts.get("syncs") and cuda:
        syncs = _sync_sites(step, batches)  # every rank steps; rank 0 keeps its sites
    if tdist.get_rank() == 0:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "all") if cuda else "cpu"
        row = dict(config=args.config, template=template, preset=preset, gpus=world, gpu_ids=gpu,
                   precision=precision, micro_batch=mb, seq_len=seq, n_params=n_params, flops_per_token=fpt,
                   step_s=dt, window_step_s=windows, warmup_s=warm_s, tokens_per_s_per_gpu=tok_per_gpu,
                   tflops_per_gpu=tok_per_gpu * fpt / 1e12, peak_mem_gib=max(mems), final_loss=float(loss), **info,
                   **outcome())
        if prof:
            row["profile"] = prof
        if opts.get("syncs"):
            row["host_syncs"] = syncs  # None off CUDA
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(args.out)  # atomic: a job killed mid-write leaves no half row
    from pipeline import dist

    dist.shutdown()  # every rank


_JOB_IDS = itertools.count()


@dataclass
class Job:
    """One ``torchrun`` worker job: what it measures, its process, where its row and its output go."""

    spec: str
    gpus: int
    gpu: int | None  # the one visible GPU of a side-by-side one-GPU job, else None (all visible)
    proc: subprocess.Popen
    row_path: Path
    log_path: Path
    log_file: Any
    t0: float

    @classmethod
    def start(cls, spec: str, n: int, args: argparse.Namespace, out_dir: Path, gpu: int | None) -> Job:
        tag = f"{spec}-{n}-{gpu}-{next(_JOB_IDS)}".replace("+", "_").replace("=", "")  # a spec may repeat
        row_path = out_dir / f".row-{tag}.json"
        row_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--config", spec, "--out", str(row_path), "--preset", args.preset, "--vocab",
               str(args.vocab), "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--windows", str(args.windows), "--device", args.device]
        if args.micro_batch:
            cmd += ["--micro_batch", str(args.micro_batch)]
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        if args.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        log_path = out_dir / f".log-{tag}.txt"
        log_file = open(log_path, "w")  # noqa: SIM115 - closed in collect()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
        return cls(spec, n, gpu, proc, row_path, log_path, log_file, time.time())

    def collect(self, timeout: float) -> dict:
        """Wait for the job (killed once ``timeout`` seconds after its start) and return its row, or a
        ``failed`` row holding the end of its output."""
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun starts its workers in sessions of their own and kills them only
            # when it is itself terminated; a killed torchrun leaves them running (e.g. hung in teardown,
            # holding the GPU while the next job is timed)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        log = self.log_path.read_text(errors="replace")
        self.log_path.unlink(missing_ok=True)
        if self.row_path.exists():
            row = json.loads(self.row_path.read_text())
            self.row_path.unlink()
            row["wall_s"] = time.time() - self.t0
            if self.proc.returncode != 0:
                # the row is written once everything is measured; a job killed after that (e.g. at its timeout,
                # hanging in process-group teardown) keeps its figures, and the row says so
                print(f"note: {self.spec} on {self.gpus} GPU(s) exited with rc {self.proc.returncode} after writing "
                      f"its row; the row is kept", flush=True)
                row["exit_rc"] = self.proc.returncode
            return row
        where = "" if self.gpu is None else f" (GPU {self.gpu})"
        print(f"FAILED {self.spec} on {self.gpus} GPU(s){where} rc {self.proc.returncode}:\n{log[-2500:]}", flush=True)
        return dict(config=self.spec, gpus=self.gpus, gpu_ids=str(self.gpu) if self.gpu is not None else "all",
                    failed=True, error=log[-2000:])


def driver(args: argparse.Namespace) -> None:
    import importlib.metadata as md

    import torch

    specs = [s for s in args.configs.split(",") if s]
    for s in specs:
        parse_config(s)  # refuse a misspelled configuration before anything runs
    specs = specs * args.repeat  # rounds in turn: each configuration's spread across rounds is the run's noise
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for the smoke mode)")
    n_visible = torch.cuda.device_count() if cuda else 2
    peak = measure_peak_tflops() if cuda else None
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"pretrain-{stamp}.json"
    versions = {p: md.version(p) for p in ("torch", "deepspeed", "transformers")}
    rows: list[dict] = []
    t_start = time.time()

    def save() -> None:  # after every job, so a run cut short keeps what it measured
        finish(rows, peak)
        path.write_text(json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), gpu=name,
                                        measured_peak_bf16_tflops=peak, preset=args.preset, vocab=args.vocab,
                                        seq_len=args.seq_len, steps=args.steps, windows=args.windows,
                                        warmup=args.warmup, repeat=args.repeat,
                                        versions=versions, rows=rows, summary=summarize(rows)), indent=1))

    def report(row: dict) -> None:
        if row.get("failed"):
            return
        mfu = f"MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        print(f"{row['config']:>34} {row['gpus']} GPU [{row['gpu_ids']}]: {row['tokens_per_s_per_gpu']:>10,.0f} "
              f"tok/s/GPU {row['tflops_per_gpu']:6.1f} TFLOP/s/GPU {mfu} mem {row['peak_mem_gib']:.1f} GiB "
              f"(wall {row['wall_s']:.0f} s)", flush=True)

    for n in [int(x) for x in args.gpus.split(",")]:
        if n > n_visible:
            print(f"skip {n} GPUs: only {n_visible} visible", flush=True)
            continue
        if time.time() - t_start > args.budget:
            print(f"skip {n} GPUs: --budget {args.budget} s spent", flush=True)
            continue
        if n == 1 and args.parallel and n_visible > 1:
            # one-GPU jobs side by side, one per GPU; the baseline on every GPU
            queue = [(s, g) for s in specs if s.split("+")[0] == "baseline" and "+" not in s
                     for g in range(n_visible)]
            queue += [(s, None) for s in specs if not (s.split("+")[0] == "baseline" and "+" not in s)]
            running: dict[int, Job] = {}
            while queue or running:
                for g in range(n_visible):
                    if g in running or not queue or time.time() - t_start > args.budget:
                        continue
                    idx = next((i for i, (_, want) in enumerate(queue) if want in (None, g)), None)
                    if idx is None:
                        continue
                    s, _ = queue.pop(idx)
                    running[g] = Job.start(s, 1, args, out_dir, g)
                if not running:
                    if queue:
                        print(f"skip {[s for s, _ in queue]}: --budget {args.budget} s spent", flush=True)
                    break
                time.sleep(1)
                for g, job in list(running.items()):
                    if job.proc.poll() is not None or time.time() - job.t0 > args.timeout:
                        row = job.collect(args.timeout)
                        rows.append(row)
                        del running[g]
                        save()
                        report(row)
        else:
            for s in specs:
                if time.time() - t_start > args.budget:
                    print(f"skip {s} on {n} GPUs: --budget {args.budget} s spent", flush=True)
                    continue
                row = Job.start(s, n, args, out_dir, None).collect(args.timeout)
                rows.append(row)
                save()
                report(row)
    save()
    profiles = [r for r in rows if r.get("profile")]
    if profiles:
        ppath = out_dir / f"profiles-{stamp}.txt"
        ppath.write_text("\n\n".join(f"=== {r['config']} on {r['gpus']} GPU(s) [{r['gpu_ids']}]\n{r['profile']}"
                                     for r in profiles))
        print(f"profiles -> {ppath}")
    for r in rows:
        if r.get("host_syncs"):
            hs = r["host_syncs"]
            print(f"host synchronisations per step, {r['config']} on {r['gpus']} GPU(s): {hs['per_step']:g}")
            for c, where in hs["sites"]:
                print(f"  {c:5.2f}  {where}")
    print_table(rows, name, peak, args, versions)
    print_summary(summarize(rows))
    print(f"-> {path}")


def finish(rows: list[dict], peak: float | None) -> None:
    """Add MFU, the ratio to the baseline and weak scaling to every row that ran.

    The baseline of a row is the mean tokens/s of the ``baseline`` rows with the same GPU count, preset and
    micro-batch, on the same GPU where there are such (parallel one-GPU rows), else on any.  Listing
    ``baseline`` more than once (e.g. first and last) measures it repeatedly: ``baseline_runs`` holds every
    figure averaged, so its spread is the run's noise.  Weak scaling: tokens/s per GPU over the same
    configuration's first one-GPU row."""
    ok = [r for r in rows if not r.get("failed")]
    for r in ok:
        r["mfu"] = r["tflops_per_gpu"] / peak if peak else None

        def same_setup(b: dict, r: dict = r) -> bool:
            return (b["template"] == "baseline" and b["gpus"] == r["gpus"] and b["preset"] == r["preset"]
                    and b["micro_batch"] == r["micro_batch"])

        bases = [b for b in ok if same_setup(b)]
        bases = [b for b in bases if b["gpu_ids"] == r["gpu_ids"]] or bases
        base = statistics.mean(b["tokens_per_s_per_gpu"] for b in bases) if bases else None
        one = next((b for b in ok if b["config"] == r["config"] and b["gpus"] == 1), None)
        r["baseline_gpu_ids"] = bases[0]["gpu_ids"] if bases else None
        r["baseline_runs"] = [b["tokens_per_s_per_gpu"] for b in bases]
        r["ratio_to_baseline"] = r["tokens_per_s_per_gpu"] / base if base else None
        r["weak_scaling"] = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"] if one else None


#: options that only add measurements after the timed steps (rows with them time the same configuration)
MEASURE_ONLY = ("profile", "syncs", "trace")


def summarize(rows: list[dict]) -> list[dict]:
    """One line per configuration measured more than once (``--repeat``, or listed twice): the median of its rows'
    tokens/s per GPU, their range, and the ratio of that median to the median of the ``baseline`` rows of the same
    GPU count, preset and micro-batch.  Rows that differ only in measurement-only options (:data:`MEASURE_ONLY`)
    count as the same configuration.  Medians of rounds taken in turn are what to compare: they are robust to one
    slow job (a cold GPU, a neighbour's load)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("failed"):
            continue
        base, *opts = r["config"].split("+")
        kept = "+".join([base] + [o for o in opts if o.partition("=")[0] not in MEASURE_ONLY])
        groups.setdefault((kept, r["gpus"], r["preset"], r["micro_batch"]), []).append(r)
    medians = {k: statistics.median(x["tokens_per_s_per_gpu"] for x in g) for k, g in groups.items()}
    out = []
    for (config, gpus, preset, mb), g in groups.items():
        if len(g) < 2:
            continue
        tps = [x["tokens_per_s_per_gpu"] for x in g]
        base = medians.get(("baseline", gpus, preset, mb))
        med = medians[(config, gpus, preset, mb)]
        out.append(dict(config=config, gpus=gpus, preset=preset, micro_batch=mb, n=len(g), median_tokens_per_s=med,
                        min_tokens_per_s=min(tps), max_tokens_per_s=max(tps),
                        median_ratio_to_baseline=med / base if base else None))
    return out


def print_summary(summary: list[dict]) -> None:
    if not summary:
        return
    print("\nmedian over rounds (configurations measured more than once):")
    for s in summary:
        ratio = f"{s['median_ratio_to_baseline']:.3f}x" if s["median_ratio_to_baseline"] else "-"
        print(f"{s['config']:>34} {s['gpus']} GPU(s) n={s['n']}: median {s['median_tokens_per_s']:>10,.0f} tok/s/GPU "
              f"(range {s['min_tokens_per_s']:,.0f}-{s['max_tokens_per_s']:,.0f}), {ratio} the baseline's median")


def print_table(rows: list[dict], name: str, peak: float | None, args: argparse.Namespace, versions: dict) -> None:
    peak_s = f"measured bf16 peak {peak:.0f} TFLOP/s" if peak else "no peak (CPU)"
    print(f"\n{name}, {peak_s}, preset {args.preset}, seq {args.seq_len}; {versions}")
    w = max([34] + [len(r["config"]) for r in rows])
    print(f"{'config':>{w}} {'GPUs':>4} {'GPU':>4} {'mb':>3} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} "
          f"{'vs base':>8} {'weak':>6}")

    def f(v, fmt):
        return fmt.format(v) if v is not None else "-"

    for r in rows:
        if r.get("failed"):
            print(f"{r['config']:>{w}} {r['gpus']:>4} {r['gpu_ids']:>4}  FAILED")
            continue
        print(f"{r['config']:>{w}} {r['gpus']:>4} {r['gpu_ids']:>4} {r['micro_batch']:>3} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {r['tflops_per_gpu']:>8.1f} {f(r['mfu'], '{:.1%}'):>6} "
              f"{r['peak_mem_gib']:>8.1f} {f(r['ratio_to_baseline'], '{:.2f}x'):>8} {f(r['weak_scaling'], '{:.0%}'):>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts, e.g. 1,2,4")
    ap.add_argument("--configs", default="baseline,zero1_fp16,zero2_fp16,zero3_fp16,zero2_bf16",
                    help="comma-separated configurations (see above)")
    ap.add_argument("--preset", default="124m", help="model and micro-batch from this preset")
    ap.add_argument("--micro_batch", type=int, default=0, help="override the preset's micro-batch for every row")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    ap.add_argument("--windows", type=int, default=5, help="timing windows the timed steps are split into")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the configuration list this many times in turn; a summary gives each configuration's "
                         "median over the rounds and its ratio to the baseline's median")
    ap.add_argument("--warmup", type=int, default=6, help="untimed optimizer steps first")
    ap.add_argument("--parallel", action="store_true", help="one-GPU jobs side by side, one per visible GPU")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job")
    ap.add_argument("--budget", type=float, default=1e9, help="start no job after this many seconds")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke mode (see above)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="output folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k in ("steps", "windows", "seq_len", "vocab", "repeat"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be positive")
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step compiles and builds)")
    if args.worker:
        worker(args)
    else:
        try:
            [parse_config(s) for s in args.configs.split(",") if s]
        except ValueError as e:
            ap.error(str(e))
        driver(args)


if __name__ == "__main__":
    main()
