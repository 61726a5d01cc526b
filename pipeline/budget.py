"""Training budgets: what each model of a run cost, so that models can be compared at equal cost.

Every stage that makes a model writes ``metrics["budget"]`` into its manifest (:func:`training_budget`):

- ``steps``, ``tokens``: this stage's optimizer steps (applied or skipped) and training tokens processed
  (steps × global batch × seq_len, all ranks);
- ``train_s``: wall seconds of this stage's training loop (:meth:`pipeline.train.Trainer.fit`: engine set-up,
  steps, evaluations, checkpoints, export) in the last process that ran it (a resumed run counts only the
  seconds after the resume);
- ``device_s``: ``train_s × world_size``, GPU-seconds on CUDA and CPU-process-seconds on CPU (``device``);
- ``cumulative``: the same three summed with the model it descends from (``parent``): a pruned or distilled
  student and the longer-trained teacher carry the teacher's pretraining; a model from a fresh initialisation
  carries nothing.
"""

from __future__ import annotations

from typing import Any


def training_budget(steps: int, tokens: int, train_s: float, world_size: int, device: str,
                    parent: dict | None = None, parent_name: str | None = None) -> dict[str, Any]:
    """The ``budget`` block of a stage's manifest (see the module docstring).

    Args:
        steps, tokens: this stage's optimizer steps and training tokens.
        train_s: wall seconds of this stage's training (0 for a stage that does not train, such as pruning).
        world_size: processes that trained.
        device: ``cuda`` or ``cpu`` (DeepSpeed's accelerator name).
        parent: the ``budget`` block of the model this one starts from (``None``: a fresh initialisation).
        parent_name: the stage (or control) ``parent`` belongs to, recorded in ``descends_from``.
    """
    own = {"steps": int(steps), "tokens": int(tokens), "device_s": float(train_s) * int(world_size)}
    cum = dict(own)
    chain: list[str] = []
    if parent:
        pc = parent.get("cumulative", parent)
        cum = {k: own[k] + type(own[k])(pc.get(k) or 0) for k in own}
        chain = [parent_name or "?", *parent.get("descends_from", [])]
    return {**own, "train_s": float(train_s), "world_size": int(world_size), "device": device,
            "unit": device_seconds_unit(device), "cumulative": cum, "descends_from": chain}


def device_seconds_unit(device: str | None) -> str:
    """``GPU-s`` on CUDA, ``CPU-s`` on CPU, else ``<device>-s``."""
    return {"cuda": "GPU-s", "cpu": "CPU-s"}.get(device or "", f"{device}-s")


def budget_of(manifest: dict) -> dict | None:
    """A stage manifest's ``metrics["budget"]``; for a manifest written before budgets were recorded, one rebuilt
    from its ``steps``, ``tokens_seen`` and ``wall_time_s`` (the whole stage's seconds, an upper bound), marked
    ``"estimated": True``; ``None`` when the manifest has neither."""
    m = manifest.get("metrics", {}) or {}
    if isinstance(m.get("budget"), dict):
        return m["budget"]
    if "steps" not in m or "tokens_seen" not in m:
        return None
    world = int(m.get("world_size") or manifest.get("outputs", {}).get("world_size") or 1)
    b = training_budget(m["steps"], m["tokens_seen"], float(manifest.get("wall_time_s") or 0.0), world,
                        "cuda" if manifest.get("provenance", {}).get("hardware", {}).get("gpu") else "cpu")
    b["estimated"] = True
    return b
