"""Pretraining throughput: this project's engine (DeepSpeed ZeRO-1/2/3, fp16/bf16) against a plain PyTorch
baseline (DDP + ``torch.compile`` + bf16 autocast + fused AdamW), same model, batch and sequence length, same
GPUs, one run.

    python scripts/bench_pretrain.py --gpus 1,2 --configs baseline,zero2_fp16,zero3_fp16 [--preset 124m]

The driver launches one ``torchrun`` job per (configuration, GPU count); each job times ``--steps`` optimizer
steps after ``--warmup`` untimed ones (compilation and JIT builds fall in the warm-up) and reports the median
step.  Figures per GPU: tokens/s, TFLOP/s (6N + 12·L·d·T FLOPs per token, as in PaLM's appendix B and
nanoGPT), MFU against the bf16 matrix-multiply peak measured here with an 8192³ matmul, peak memory; plus the
ratio to the baseline with the same GPU count and the weak-scaling efficiency against one GPU.
Output: a table on stdout and ``results/bench/pretrain-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (DeepSpeed template or None for the baseline, precision)
    "baseline": (None, "bf16"),
    "zero1_fp16": ("zero1_fp16", "fp16"),
    "zero2_fp16": ("zero2_fp16", "fp16"),
    "zero3_fp16": ("zero3_fp16", "fp16"),
    "zero2_bf16": ("zero2_bf16", "bf16"),
}


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


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as tdist

    from pipeline.config import parse_cli
    from pipeline.model import count_params, flops_per_token
    from pipeline.train import TrainConfig, causal_lm_loss

    cfg = parse_cli(TrainConfig, ["--preset", args.preset] + (["--micro_batch_size", str(args.micro_batch)]
                                                              if args.micro_batch else []), "pretrain", validate=False)
    template, precision = CONFIGS[args.config]
    seq = args.seq_len
    mb = cfg.micro_batch_size
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    from pipeline.model import build_model

    model = build_model(cfg.model, args.vocab, seq, seed=cfg.seed)
    n_params = count_params(model)
    fpt = flops_per_token(n_params, cfg.model.n_layer, cfg.model.d_model, seq)

    if template is None:  # plain PyTorch baseline
        tdist.init_process_group("nccl")
        world = tdist.get_world_size()
        model = model.cuda()
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank], gradient_as_bucket_view=True)
        cmodel = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                fused=True)

        def step(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = causal_lm_loss(cmodel, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:  # this project's engine, as scripts/pretrain.py builds it
        from pipeline.ds_config import resolve_ds_config
        from pipeline.engine import build_engine, init_distributed

        launcher = init_distributed()
        world = tdist.get_world_size()
        dsc = resolve_ds_config(template, micro_batch_size=mb, grad_accum=1, world_size=world, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps,
                                grad_clip=cfg.grad_clip, precision=precision)
        engine = build_engine(model, dsc, precision, lambda s: 1.0,
                              dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay),
                              launcher)
        if args.compile:
            engine.ds.compile()

        def step(batch):
            loss, _ = causal_lm_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            return loss

    g = torch.Generator(device="cpu").manual_seed(1234 + tdist.get_rank())
    batches = [torch.randint(0, args.vocab, (mb, seq + 1), generator=g).cuda() for _ in range(4)]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(batches[i % len(batches)])
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_per_gpu = mb * seq / dt
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    mems = [None] * world
    tdist.all_gather_object(mems, peak_mem)  # every rank must call it
    if tdist.get_rank() == 0:
        row = dict(config=args.config, gpus=world, precision=precision, micro_batch=mb, seq_len=seq,
                   n_params=n_params, step_s=dt, tokens_per_s_per_gpu=tok_per_gpu,
                   tflops_per_gpu=tok_per_gpu * fpt / 1e12, peak_mem_gib=max(mems), final_loss=float(loss),
                   compiled=bool(args.compile or template is None), step_times=times)
        Path(args.out).write_text(json.dumps(row))
    tdist.barrier()
    tdist.destroy_process_group()


def driver(args: argparse.Namespace) -> None:
    import torch

    peak = measure_peak_tflops()
    name = torch.cuda.get_device_name(0)
    rows = []
    out_dir = ROOT / "results" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in [int(x) for x in args.gpus.split(",")]:
        if n > torch.cuda.device_count():
            print(f"skip {n} GPUs: only {torch.cuda.device_count()} visible", flush=True)
            continue
        for c in args.configs.split(","):
            tmp = out_dir / f".row-{c}-{n}.json"
            tmp.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
                   "--worker", "--config", c, "--out", str(tmp), "--preset", args.preset, "--vocab", str(args.vocab),
                   "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.micro_batch:
                cmd += ["--micro_batch", str(args.micro_batch)]
            if args.compile and c != "baseline":
                cmd += ["--compile"]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if r.returncode != 0 or not tmp.exists():
                print(f"FAILED {c} on {n} GPU(s) (rc {r.returncode}):\n{r.stderr[-3000:]}", flush=True)
                rows.append(dict(config=c, gpus=n, failed=True, error=r.stderr[-2000:]))
                continue
            row = json.loads(tmp.read_text())
            tmp.unlink()
            row["mfu"] = row["tflops_per_gpu"] / peak
            row["wall_s"] = time.time() - t0
            rows.append(row)
            print(f"{c:>12} {n} GPU: {row['tokens_per_s_per_gpu']:>10,.0f} tok/s/GPU {row['tflops_per_gpu']:6.1f} "
                  f"TFLOP/s/GPU  MFU {row['mfu']:.1%}  mem {row['peak_mem_gib']:.1f} GiB", flush=True)
    ok = [r for r in rows if not r.get("failed")]
    for r in ok:
        base = next((b for b in ok if b["config"] == "baseline" and b["gpus"] == r["gpus"]), None)
        one = next((b for b in ok if b["config"] == r["config"] and b["gpus"] == 1), None)
        r["ratio_to_baseline"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None
        r["weak_scaling"] = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"] if one else None
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "deepspeed", "transformers")}
    result = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), gpu=name, measured_peak_bf16_tflops=peak,
                  preset=args.preset, vocab=args.vocab, seq_len=args.seq_len, versions=versions, rows=rows)
    path = out_dir / f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{name}, measured bf16 peak {peak:.0f} TFLOP/s, preset {args.preset}, seq {args.seq_len}; {versions}")
    print(f"{'config':>12} {'GPUs':>4} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'vs base':>8} {'weak':>6}")
    for r in ok:
        f = lambda v, fmt: (fmt.format(v) if v is not None else "-")  # noqa: E731
        print(f"{r['config']:>12} {r['gpus']:>4} {r['tokens_per_s_per_gpu']:>10,.0f} {r['tflops_per_gpu']:>8.1f} "
              f"{r['mfu']:>6.1%} {r['peak_mem_gib']:>8.1f} {f(r['ratio_to_baseline'], '{:.2f}x'):>8} "
              f"{f(r['weak_scaling'], '{:.0%}'):>6}")
    print(f"-> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts, e.g. 1,2,4")
    ap.add_argument("--configs", default="baseline,zero1_fp16,zero2_fp16,zero3_fp16,zero2_bf16",
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--preset", default="124m", help="model and micro-batch from this preset")
    ap.add_argument("--micro_batch", type=int, default=0, help="override the preset's micro-batch")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="engine.compile() the DeepSpeed engine")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
