"""Stage manifests: the one file that says a stage finished, what it read and what it made.

A stage directory ``results/<run>/<NN_stage>/`` is complete exactly when its ``manifest.json``
exists; the manifest is written last, atomically (temporary file + ``os.replace``), by rank 0.
Later stages read their inputs only through :func:`require_stage`, which refuses a missing or
incomplete stage and names the ``make`` target that makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import dist

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

#: stage directory name -> make target that produces it
STAGE_DIRS = {
    "data": "01_data",
    "pretrain": "02_pretrain",
    "prune": "03_prune",
    "distill": "04_distill",
    "eval": "05_eval",
    "classify": "02b_classify",  # the encoder path (TASK=classify): fine-tuning after 02_pretrain
}

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "torch-pruning", "tokenizers", "numpy", "tensorboard")


class StageError(RuntimeError):
    """An upstream stage is missing or incomplete, or an output directory may not be written."""


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """``<run_dir>/<NN_stage>`` for a stage name (``data``, ``pretrain``, ...)."""
    return Path(run_dir) / STAGE_DIRS[stage]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """Hex sha256 over the names and bytes of every file under ``path`` (sorted), e.g. a tokenizer."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(seed: int | None = None) -> dict[str, Any]:
    """Where and how a stage ran: git commit and dirty flag, argv, package versions, launcher, world size."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    hardware: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            hardware["gpu"] = torch.cuda.get_device_name(0)
            hardware["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "packages": versions,
        "launcher": dist.launcher(),
        "world_size": dist.world_size(),
        "seed": seed,
        "host": platform.node(),
        "hardware": hardware,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: dict,
    outputs: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    inputs: dict[str, str | Path] | None = None,
    seed: int | None = None,
    wall_time_s: float | None = None,
) -> dict | None:
    """Write ``<out_dir>/manifest.json`` (rank 0 only; other ranks return ``None`` and write nothing).

    Args:
        out_dir: the stage directory.
        stage: stage name (``data``, ``pretrain``, ...).
        config: the resolved configuration (JSON-able).
        outputs: what the stage made, paths relative to ``out_dir`` where possible.
        metrics: final figures of the stage (losses, counts, ...).
        inputs: upstream stage directories; each is recorded with its manifest's sha256.
        seed: the stage's seed, recorded in the provenance.
        wall_time_s: the stage's wall-clock time in seconds.
    """
    if not dist.is_rank0():
        return None
    recorded_inputs = {}
    for name, d in (inputs or {}).items():
        m = Path(d) / MANIFEST
        recorded_inputs[name] = {"dir": str(d), "manifest_sha256": file_sha256(m) if m.exists() else None}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "complete": True,
        "inputs": recorded_inputs,
        "config": config,
        "outputs": outputs,
        "metrics": metrics or {},
        "wall_time_s": wall_time_s,
        "provenance": provenance(seed),
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Read a manifest file (or the one in a stage directory) as a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    with open(p) as f:
        return json.load(f)


def _run_preset(run_dir: str | Path) -> str | None:
    """The preset the run's finished stages were made with (from the first manifest found), for hints."""
    for name in STAGE_DIRS.values():
        m = Path(run_dir) / name / MANIFEST
        if m.is_file():
            try:
                return read_manifest(m).get("config", {}).get("preset")
            except (OSError, json.JSONDecodeError):
                return None
    return None


def require_stage(run_dir: str | Path, stage: str, run: str | None = None, preset: str | None = None) -> dict:
    """Return the manifest of an upstream stage, or raise :class:`StageError` naming the make target.

    The target carries the preset the run was made with (from its manifests), else ``preset`` (the one this
    command was given), else asks for ``PRESET=...``, so following the hint never trains another preset.

    Raises:
        StageError: when ``<run_dir>/<NN_stage>/manifest.json`` is missing (the stage never ran, or
            was interrupted), unreadable, of another schema version, or not marked complete.
    """
    d = stage_dir(run_dir, stage)
    run = run or Path(run_dir).name
    made_with = _run_preset(run_dir)
    if made_with:
        target = f"make {stage} RUN={run}" + (f" PRESET={made_with}" if made_with != "cpu" else "")
    elif preset:
        target = f"make {stage} RUN={run} PRESET={preset}"
    else:
        target = f"make {stage} RUN={run} PRESET=<the preset you use; cpu when omitted>"
    fix = f"run `{target}` first (or pass the right --run/--results_dir)"
    m = d / MANIFEST
    if not d.exists():
        raise StageError(f"stage '{stage}' has not been run: {d} does not exist; {fix}")
    if not m.exists():
        raise StageError(f"stage '{stage}' is incomplete: {d} has no {MANIFEST} (interrupted run?); {fix}")
    try:
        manifest = read_manifest(m)
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"stage '{stage}': cannot read {m} ({e}); {fix}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION or not manifest.get("complete"):
        raise StageError(
            f"stage '{stage}': {m} has schema version {manifest.get('schema_version')} "
            f"(expected {SCHEMA_VERSION}) or is not complete; {fix}"
        )
    check_lineage(run_dir, stage, manifest, target)
    manifest["_dir"] = str(d)
    return manifest


def check_lineage(run_dir: str | Path, stage: str, manifest: dict, target: str | None = None) -> None:
    """Refuse a stage output made from other upstream outputs than the run's current ones.

    Every upstream stage a manifest records (``inputs``: name -> the sha256 of its manifest when this stage ran)
    is compared with that stage's manifest in ``run_dir`` now.  A stage made before its upstream was re-made (or
    copied from another run) is stale: reading it would pair, say, an old model with new tokens.

    Raises:
        StageError: naming the stale stage, the upstream that changed, both hashes and the make target.
    """
    d = stage_dir(run_dir, stage)
    target = target or f"make {stage} RUN={Path(run_dir).name}"
    for name, rec in (manifest.get("inputs") or {}).items():
        if name not in STAGE_DIRS or not isinstance(rec, dict) or not rec.get("manifest_sha256"):
            continue
        up = stage_dir(run_dir, name) / MANIFEST
        now = file_sha256(up) if up.is_file() else None
        if now != rec["manifest_sha256"]:
            state = f"now {now[:12]}" if now else "now missing"
            raise StageError(
                f"stage '{stage}' ({d.name}) is stale: it was made from another {STAGE_DIRS[name]} (its manifest "
                f"recorded {STAGE_DIRS[name]}/{MANIFEST} sha256 {rec['manifest_sha256'][:12]}, {state}); re-run "
                f"`{target}` so that it reads this run's {STAGE_DIRS[name]}")


def tokenizer_fingerprint(folder: str | Path) -> str | None:
    """sha256 of what makes a tokenizer tokenize: ``tokenizer.json``'s model (vocabulary, merges), normalizer,
    pre-tokenizer and added tokens, in canonical JSON (``None`` when the folder has no ``tokenizer.json``).
    Equal for a tokenizer and its ``save_pretrained`` copy, unlike the files' bytes."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return None
    t = json.loads(p.read_text())
    core = {k: t.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def check_same_tokenizer(folders: dict[str, str | Path], fix: str) -> None:
    """Refuse models whose tokenizers differ (same vocabulary size or not): a model scored or distilled with
    another tokenizer's ids reads other words.

    Args:
        folders: what -> folder holding a ``tokenizer.json`` (the first is the reference, e.g. stage 01's).
        fix: the command that re-makes the odd one out.

    Raises:
        StageError: naming the two folders whose tokenizers differ.
    """
    items = [(k, Path(v), tokenizer_fingerprint(v)) for k, v in folders.items()]
    items = [x for x in items if x[2] is not None]
    if not items:
        return
    ref_name, ref_dir, ref = items[0]
    for name, folder, fp in items[1:]:
        if fp != ref:
            raise StageError(f"the {name} tokenizer ({folder}/tokenizer.json) differs from the {ref_name} tokenizer "
                             f"({ref_dir}/tokenizer.json): its token ids mean other text; {fix}")


def prepare_output_dir(out_dir: str | Path, config_hash: str, overwrite: bool, stage: str,
                       also_accept: tuple[str, ...] = ()) -> None:
    """Check that ``out_dir`` may be written by a run with ``config_hash``; no files are changed.

    An existing complete output made with another configuration is refused unless ``overwrite``; ``also_accept``
    lists other hashes of this same configuration (as computed by an earlier version of the stage).

    Raises:
        StageError: naming the directory, both configurations' hashes and the fix.
    """
    m = Path(out_dir) / MANIFEST
    if m.exists() and not overwrite:
        try:
            old = read_manifest(m).get("outputs", {}).get("config_hash")
        except (OSError, json.JSONDecodeError):
            old = None
        if old != config_hash and old not in also_accept:
            raise StageError(
                f"{out_dir} already holds a different run's {stage} output (config {old}, this run {config_hash}); "
                f"pass --overwrite to replace it, or choose another RUN"
            )
