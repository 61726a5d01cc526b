"""Stage 05: evaluate every model of a run (dense, pruned, distilled) on the same tokens and hardware.

    python scripts/evaluate.py --run NAME [--preset cpu|tiny|124m|350m] [--key value ...]

Reads ``results/<run>/01_data`` (validation tokens, tokenizer) and the models named by the manifests of
``02_pretrain`` (required), ``03_prune`` and ``04_distill`` (when present); writes ``results/<run>/05_eval/``:
``results.json`` (the table), ``metrics.jsonl``, ``manifest.json`` (last), and TensorBoard scalars
``eval/<model>/<metric>`` under ``results/<run>/tb/eval/``.  Runs as one process (other ranks exit).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipeline import dist
from pipeline.cli import run_stage
from pipeline.config import ConfigError, config_hash, to_dict
from pipeline.data import small_validation_warning, validation_prompt
from pipeline.evaluate import (
    EvalConfig,
    check_inputs,
    decode_speed,
    find_models,
    forward_latency,
    generate,
    generation_speed,
    measure_sparse_24,
    scalars,
    size_stats,
    speedups,
    validation_loss,
)
from pipeline.manifest import (
    StageError,
    atomic_write_json,
    require_stage,
    stage_dir,
    write_manifest,
)
from pipeline.metrics import MetricsLogger
from pipeline.stage_output import StageOutput
from pipeline.timing import choose_threads, interleaved_forward_latency, interleaved_generation
from pipeline.tokens import load_tokens


def time_on_cpu(models: dict[str, torch.nn.Module], results: dict[str, dict], tokenizer, vocab: int,
                cfg: EvalConfig) -> dict | None:
    """The CPU timing protocol (``pipeline.timing``): the thread count (``cfg.threads``, or the choice between 1
    and all cores on the dense model at the reference shape, ``pipeline.timing.choose_threads``), then every shape's forward and the generation,
    the models' repeats interleaved; fills ``results[name]["latency"]`` and the ``gen_*`` figures.  Returns
    the thread choice's measurements (``None`` when ``cfg.threads`` fixed the count)."""
    choice = None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        ids = torch.randint(0, vocab, (max(cfg.batch_sizes), max(cfg.seq_lens)),
                            generator=torch.Generator().manual_seed(cfg.seed))
        dense = models["dense"]
        with torch.inference_mode():
            choice = choose_threads(lambda: dense(input_ids=ids, use_cache=False), cfg.warmup, cfg.repeats)
        print(f"eval: timing at {choice['threads']} CPU thread(s) (median ms / relative spread per count: "
              + ", ".join(f"{n}: {c['median_ms']:.1f} / {c['rel_spread']:.2f}" for n, c in choice["candidates"].items())
              + ")", flush=True)
    lat = interleaved_forward_latency(models, vocab, cfg.batch_sizes, cfg.seq_lens, cfg.warmup, cfg.repeats,
                                      max_spread=cfg.max_spread, seed=cfg.seed)
    gen = interleaved_generation(models, tokenizer, cfg.prompt, cfg.gen_tokens, cfg.gen_repeats,
                                 max_spread=cfg.max_spread)
    for name in models:
        results[name]["latency"] = lat[name]
        results[name].update(gen[name])
    return choice


def main(cfg: EvalConfig) -> dict | None:
    """Run stage 05 with ``cfg``; return the manifest written (``None`` on ranks other than 0).

    Raises:
        StageError: an upstream stage missing or incomplete (the message names its make target), or an
            existing 05_eval output of another configuration without ``--overwrite``.
        ConfigError: measurements the models cannot make (sequence lengths beyond their positions).
    """
    t_start = time.time()
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems)
    if not dist.is_rank0():
        return None  # evaluation is one process; other ranks of a launcher have nothing to do

    # 1. inputs, found only through manifests; every check before anything is written
    run_dir = cfg.run_dir()
    data = require_stage(run_dir, "data", cfg.run, cfg.preset)
    data_dir = Path(data["_dir"])
    entries = find_models(run_dir, cfg.models)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data_dir / data["outputs"]["tokenizer_dir"])
    val = load_tokens(data_dir, "val", data)
    if cfg.max_val_tokens:
        val = val[: cfg.max_val_tokens + 1]
    seq_len = int(data["outputs"]["seq_len"])
    if len(val) < seq_len + 1:
        raise StageError(f"{data_dir} holds {len(val)} validation tokens, fewer than one block of {seq_len} + 1; "
                         f"re-run `make data` with a larger val_fraction (or raise --max_val_tokens)")
    prompt_source = "--prompt"
    if not cfg.prompt:  # the user's own text, not a fixed Shakespeare line
        cfg = dataclasses.replace(cfg, prompt=validation_prompt(tokenizer, val, data["outputs"].get("eos_id")))
        prompt_source = "the first words of the first validation document"
    check_inputs(cfg, entries, data, len(tokenizer(cfg.prompt)["input_ids"]))
    from pipeline.manifest import check_same_tokenizer

    check_same_tokenizer({"stage-01": data_dir / data["outputs"]["tokenizer_dir"],
                          **{f"{e.name} model's": e.model_dir for e in entries}},
                         "re-run the stage that made that model (`make pretrain|prune|distill`)")
    out_dir = stage_dir(run_dir, "eval")
    chash = config_hash(cfg)
    output = StageOutput(out_dir, cfg.tb_root() / "eval")
    output.check(chash, cfg.overwrite, "eval")

    # 2. from here on files are written, into temporary folders: an earlier complete output (manifest, table,
    # logs) stays as it is until this evaluation has succeeded (a failing --overwrite loses nothing)
    with output.staging() as staged:
        staging, tb_dir = staged.dir, staged.tb_dir
        device = cfg.resolved_device()
        dtype = cfg.resolved_dtype()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        vocab = int(data["outputs"]["vocab_size"])
        results: dict[str, dict] = {}
        samples: dict[str, str] = {}
        cpu_models: dict[str, torch.nn.Module] = {}
        thread_choice: dict | None = None

        # 3. every model: quality (fp32), size, sample, then speed in the measurement dtype
        with MetricsLogger(staging / "metrics.jsonl", tb_dir) as log:
            for e in entries:
                print(f"eval: {e.name} ({e.model_dir})", flush=True)
                model = load_model_named(e.model_dir).to(device).eval()
                row = {"stage": e.stage, "stage_dir": e.stage_dir.name, "method": e.method,
                       "masks": str(e.masks) if e.masks else None}
                row.update(size_stats(model, e.model_dir, e.masks))
                row["val_loss"], row["val_ppl"] = validation_loss(model, val, seq_len, cfg.val_batch_size)
                samples[e.name], _ = generate(model, tokenizer, cfg.prompt, cfg.gen_tokens)
                model.to(dtype)
                results[e.name] = row
                if device == "cpu":
                    cpu_models[e.name] = model  # timed below, all models together (pipeline.timing)
                    continue
                row["latency"] = forward_latency(model, vocab, cfg.batch_sizes, cfg.seq_lens, cfg.warmup, cfg.repeats,
                                                 graphs=device == "cuda" and cfg.cuda_graphs, seed=cfg.seed)
                row["gen_tokens_per_s"] = generation_speed(model, tokenizer, cfg.prompt, cfg.gen_tokens, cfg.gen_repeats)
                if device == "cuda" and cfg.sparse_24 and row["is_2_4"]:
                    row["sparse_24"] = measure_sparse_24(model, vocab, cfg, tokenizer, row["latency"])
                del model
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            if cpu_models:
                thread_choice = time_on_cpu(cpu_models, results, tokenizer, vocab, cfg)
                cpu_models.clear()
            if cfg.decode:  # all models at once, interleaved: after the loop above has freed each one
                print("eval: decode speed (static KV cache, every model interleaved)", flush=True)
                for name, rows in decode_speed(entries, cfg, tokenizer).items():
                    results[name]["decode"] = rows
            speedups(results, baseline="dense")
            for step, (name, row) in enumerate(results.items()):
                log.log(step, scalars(name, row))
                log.text(step, f"eval/{name}/sample", samples[name])

        # 4. the table, then the manifest (last)
        ref = (max(cfg.batch_sizes), max(cfg.seq_lens))
        missing = {s: f"no {stage_dir(run_dir, s).name} directory" for s in ("prune", "distill")
                   if not any(e.stage == s for e in entries)}
        outputs = {
            "results": "results.json", "metrics": "metrics.jsonl", "config_hash": chash,
            "device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "timing_protocol": ({"interleaved": True, "max_spread": cfg.max_spread, "thread_choice": thread_choice}
                                if device == "cpu" else {"interleaved": False}),
            "reference_shape": {"batch": ref[0], "seq_len": ref[1]}, "models": list(results),
            "missing": missing, "prompt": cfg.prompt, "prompt_source": prompt_source, "samples": samples,
            "val_warning": small_validation_warning(len(val), seq_len),
            "val_tokens": len(val), "val_seq_len": seq_len,
        }
        atomic_write_json(staging / "results.json", {"outputs": outputs, "models": results})
        inputs = {"data": data_dir, **{e.stage if e.stage != "controls" else f"controls/{e.name}": e.stage_dir
                                       for e in entries}}
        # success: the old output is replaced, then the manifest (last)
        return staged.publish(lambda d: write_manifest(d, "eval", to_dict(cfg), outputs, metrics=results, inputs=inputs,
                                                       seed=cfg.seed, wall_time_s=time.time() - t_start))


def load_model_named(model_dir: Path):
    """The model in fp32; a config that disagrees with its weights or an unsafe file is a StageError naming it."""
    from pipeline.integrity import ModelFileError, UnsafeFileError, load_causal_lm

    try:
        return load_causal_lm(model_dir, dtype=torch.float32)
    except (ModelFileError, UnsafeFileError) as e:
        raise StageError(str(e)) from None


if __name__ == "__main__":
    run_stage(EvalConfig, "eval", main)
