"""Stage 03's pruning methods by name: what each checks, how it prunes, what it records, what stage 04 keeps.

A method is a :class:`PruneMethod` given to :func:`register`; everything that depends on the method reads it from
here: the ``--method`` choices and :meth:`pipeline.prune.PruneConfig.validate`, :func:`pipeline.prune.check_model`,
:func:`pipeline.prune.prune_model` (with the calibration blocks of the training split when the method asks for
them), the method's fields in stage 03's manifest (``scripts/prune.py``) and stage 04's rule for the masks
(:func:`pipeline.distill.distill`).  The built-in ``magnitude``, ``nm`` and ``structured`` are registered in
:mod:`pipeline.prune`; a new method is one module ``pipeline/prune_method_<name>.py`` that calls :func:`register`
(found by :func:`method_names`), plus its name in the Makefile's ``PRUNE_METHOD`` check (a test compares the two).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _no_problems(*_args: Any) -> list[str]:
    return []


def _no_fields(_cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class PruneMethod:
    """One pruning method of stage 03.

    Attributes:
        name: the ``--method`` value.
        prune: ``prune(model, cfg, calib) -> dict`` pruning ``model`` in place; ``calib`` is ``(N, seq_len)`` token
            ids of the training split, or ``None`` when :attr:`needs_calibration` says no.  Returns ``masks``
            (name -> bool keep-mask, or ``None``), ``layer_sparsity`` (name -> fraction removed), ``sparsity``,
            ``plan`` and ``depth`` (dicts or ``None``), as :func:`pipeline.prune.prune_model` documents.
        validate: ``validate(cfg) -> problems`` found without the model (called by ``PruneConfig.validate``).
        check_model: ``check_model(cfg, model) -> problems`` of this model (unsupported architecture, shapes).
        needs_calibration: ``needs_calibration(cfg) -> bool``: whether :attr:`prune` reads calibration blocks.
        target_sparsity: ``target_sparsity(cfg) -> float``: the fraction the method aims to remove.
        manifest_fields: ``manifest_fields(cfg) -> dict``: the method's settings in stage 03's manifest outputs.
        writes_masks: the method leaves the architecture and writes ``masks.safetensors``; stage 04 then refuses
            a stage 03 listing none and keeps the masked weights at zero while it trains.
    """

    name: str
    prune: Callable[..., dict[str, Any]]
    validate: Callable[[Any], list[str]] = _no_problems
    check_model: Callable[[Any, Any], list[str]] = _no_problems
    needs_calibration: Callable[[Any], bool] = lambda cfg: False
    target_sparsity: Callable[[Any], float] = lambda cfg: float(cfg.sparsity)
    manifest_fields: Callable[[Any], dict[str, Any]] = _no_fields
    writes_masks: bool = True


METHODS: dict[str, PruneMethod] = {}
_discovered = False


def register(method: PruneMethod) -> PruneMethod:
    """Add ``method`` (a name registered twice is an error: two modules would claim it)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"pruning method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import pipeline

    importlib.import_module("pipeline.prune")  # the built-in methods
    for m in pkgutil.iter_modules(pipeline.__path__):
        if m.name.startswith("prune_method_"):
            importlib.import_module(f"pipeline.{m.name}")


def method_names() -> tuple[str, ...]:
    """The registered methods' names, built-in ones first (the ``--method`` choices)."""
    _discover()
    return tuple(METHODS)


def get(name: str) -> PruneMethod:
    """The method called ``name``.

    Raises:
        KeyError: naming the registered methods.
    """
    _discover()
    if name not in METHODS:
        raise KeyError(f"no pruning method '{name}'; registered: {', '.join(METHODS)}")
    return METHODS[name]


def writes_masks(name: str | None) -> bool:
    """Whether stage 03's ``name`` method writes masks that stage 04 must find and keep (False for an unknown or
    missing name: an older manifest or a method whose module is not installed)."""
    _discover()
    m = METHODS.get(name) if name else None
    return bool(m and m.writes_masks)
