"""Typed stage configurations, named presets, and the command line generated from them.

Every stage script declares one dataclass (fields with a docstring each, given as the field's
``metadata["help"]``) and calls :func:`parse_cli`.  Values are applied in this order, later wins:

1. the dataclass defaults,
2. the named preset's section for that stage (``--preset NAME``, see :mod:`pipeline.presets`),
3. a JSON or YAML file (``--config FILE``), flat or with one section per stage,
4. ``--key value`` / ``--key=value`` overrides; nested fields use dotted keys (``--model.n_layer 4``).

Every problem (unknown key, bad value, bad choice) is collected and reported together in one
:class:`ConfigError`.  ``--local_rank``/``--local-rank`` (appended by the ``deepspeed`` launcher) are
accepted and ignored: ranks come from the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """Raised with every problem of a configuration listed, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def doc(text: str, default: Any = MISSING, default_factory: Any = MISSING, *, run_control: bool = False) -> Any:
    """A dataclass field with its docstring kept in ``metadata['help']`` (shown by ``--help``).

    ``run_control=True`` marks a field that changes how a run is driven (resume, progress bar, watchdog, which
    kernels compute the same numbers), not what it computes: :func:`config_hash` leaves it out, so a finished
    stage re-run with another value is still the same run.  A subclass that redeclares the field marks it again.
    """
    meta: dict[str, Any] = {"help": text}
    if run_control:
        meta["run_control"] = True
    kw: dict[str, Any] = {"metadata": meta}
    if default is not MISSING:
        kw["default"] = default
    if default_factory is not MISSING:
        kw["default_factory"] = default_factory
    return field(**kw)


@dataclass
class CommonConfig:
    """Fields every stage has: where the run lives and how it is seeded."""

    run: str = doc("Run name: outputs go to <results_dir>/<run>/<NN_stage>.", "default")
    results_dir: str = doc("Root folder of all runs.", "results")
    preset: str = doc("Named preset whose section for this stage is applied before --config and overrides.", "cpu")
    seed: int = doc("Seed for every random choice of the stage (split, init, data order, masks).", 1234)
    overwrite: bool = doc("Replace an existing stage output made with a different configuration.", False,
                          run_control=True)

    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.run

    def tb_root(self) -> Path:
        return self.run_dir() / "tb"


# ---------------------------------------------------------------------------------------------
# type conversion


def _resolve_hints(cls: type) -> dict[str, Any]:
    # each class's annotations are resolved in its own module (subclasses may live elsewhere)
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI, or a JSON value) to type ``tp``; raise ValueError."""
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        errors = []
        for a in args:
            try:
                return _convert(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if str(c) == str(value):
                return c
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        if isinstance(value, str):
            items = [v for v in value.split(",") if v != ""]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"expected a list, got {value!r}")
        return [_convert(v, inner, key) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ValueError(f"unsupported field type {tp!r}")


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Map dotted key -> (type, field) for every non-dataclass field, nested ones included."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _resolve_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            out.update(_leaf_fields(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (tp, f)
    return out


def _set_dotted(obj: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def apply_values(cfg: Any, values: dict[str, Any], source: str, problems: list[str]) -> None:
    """Set dotted ``values`` on ``cfg`` (a dataclass instance); append problems instead of raising."""
    leaves = _leaf_fields(type(cfg))
    for key, raw in values.items():
        key = key.replace("-", "_")
        if key not in leaves:
            close = difflib.get_close_matches(key, list(leaves), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{source}: unknown key '{key}'{hint}")
            continue
        tp, _ = leaves[key]
        try:
            _set_dotted(cfg, key, _convert(raw, tp, key))
        except ValueError as e:
            problems.append(f"{source}: '{key}': {e}")


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"--config: file '{path}' does not exist"])
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - reported to the user with the file name
        raise ConfigError([f"--config: cannot parse '{path}': {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config: '{path}' must hold a mapping of keys to values"])
    return data


def _help_text(cls: type, stage: str) -> str:
    lines = [f"usage: {stage} [--preset NAME] [--config FILE] [--key value ...]", ""]
    for key, (_tp, f) in _leaf_fields(cls).items():
        help_ = f.metadata.get("help", "")
        lines.append(f"  --{key:<28} {help_}")
    return "\n".join(lines)


def parse_cli(cls: type, argv: list[str] | None, stage: str, validate: bool = True) -> Any:
    """Build a ``cls`` instance from defaults, preset, ``--config`` file and overrides.

    Args:
        cls: the stage's config dataclass (subclass of :class:`CommonConfig`).
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).
        stage: the preset section to apply (``"data"``, ``"pretrain"``, ...).
        validate: call ``cfg.validate()`` (returning a list of problems) when the class has one.

    Raises:
        ConfigError: listing every problem found (unknown keys, bad values, failed validation).
        SystemExit: after printing the help text for ``-h``/``--help``.
    """
    from pipeline.presets import PRESETS

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help_text(cls, stage))
        raise SystemExit(0)
    problems: list[str] = []
    overrides: list[tuple[str, str]] = []
    config_file = None
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            problems.append(f"command line: unexpected argument '{tok}' (options are --key value)")
            i += 1
            continue
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            else:
                val = "true"  # a bare flag: --overwrite
        i += 1
        if key in ("local_rank", "local-rank"):
            continue  # the deepspeed launcher appends it; ranks come from the environment
        if key == "config":
            config_file = val
        else:
            overrides.append((key, val))
    cfg = cls()
    preset = dict(overrides).get("preset", cfg.preset)
    file_data = _load_file(config_file) if config_file else {}
    if "preset" in file_data and "preset" not in dict(overrides):
        preset = file_data["preset"]
    if preset not in PRESETS:
        problems.append(f"preset '{preset}' does not exist; choose one of: {', '.join(PRESETS)}")
    else:
        cfg.preset = preset
        apply_values(cfg, _flatten(PRESETS[preset].get(stage, {})), f"preset '{preset}'", problems)
    if file_data:
        section = file_data.get(stage, None)
        data = {k: v for k, v in file_data.items() if not (isinstance(v, dict) and k in STAGES)}
        if isinstance(section, dict):
            data.update(section)
        apply_values(cfg, _flatten(data), f"--config {config_file}", problems)
    apply_values(cfg, dict(overrides), "command line", problems)
    if validate and hasattr(cfg, "validate"):  # fields that failed to convert keep their defaults
        problems.extend(cfg.validate())
    if problems:
        raise ConfigError(problems)
    return cfg


STAGES = ("data", "pretrain", "prune", "distill", "eval", "report", "controls", "classify")


def to_dict(cfg: Any) -> dict:
    """The configuration as plain JSON-able data."""
    return dataclasses.asdict(cfg)


def run_control_fields(cfg: Any) -> tuple[str, ...]:
    """Names of the top-level fields of ``cfg`` (a dataclass or its class) marked ``run_control`` (see :func:`doc`)."""
    return tuple(f.name for f in fields(cfg) if f.metadata.get("run_control"))


def config_hash(cfg: Any, also_ignore: tuple[str, ...] = ()) -> str:
    """A short sha256 (16 hex digits) of the configuration, to tell runs apart.

    Left out: the fields marked ``run_control`` (:func:`run_control_fields`) and ``also_ignore`` (e.g. settings a
    checkpoint resumes across, or a field whose default keeps the hash of runs made before it existed).
    """
    return _hash_without(cfg, set(run_control_fields(cfg)) | set(also_ignore))


def legacy_config_hash(cfg: Any, ignore: tuple[str, ...]) -> str:
    """The hash as a stage computed it before run-control fields were marked: without exactly ``ignore``.

    A stage whose old list differed from its marked fields passes this to
    :func:`pipeline.manifest.prepare_output_dir` so that its own earlier output is still accepted.
    """
    return _hash_without(cfg, set(ignore))


def _hash_without(cfg: Any, ignore: set[str]) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
