"""DeepSpeed configuration: one resolver from a strict-JSON template to the config a run uses.

Templates live in ``ds_configs/*.json`` and hold ``"auto"`` for every number that depends on the
run (batch sizes, gradient clipping, AdamW hyper-parameters).  :func:`resolve_ds_config` fills
them from the stage config and the world size, sets the precision sections, checks the batch
arithmetic, and refuses unknown or misspelled keys by name at every nesting level; DeepSpeed
itself silently ignores unknown top-level keys (it reads the raw dict with ``dict.get``).

The allowed keys come from DeepSpeed's own pydantic config models where it has them
(``DeepSpeedZeroConfig`` and its offload / ZenFlow / leaf-module sub-models, ``DeepSpeedFP16Config``,
``DeepSpeedBF16Config``, the monitor, comms-logger, compile and throughput-timer configs; field names and
aliases),
from DeepSpeed's key constants and defaults dicts for the sections it reads by hand, and from the
constructor signatures of the Adam implementations DeepSpeed may build for ``"type": "AdamW"``.

Every problem is collected and reported at once in one :class:`DSConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.compat.torch_compat import cpu_has_native_bf16
from pipeline.config import ConfigError
from pipeline.manifest import atomic_write_json

#: folder of the shipped templates (``<repo>/ds_configs``)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
#: name of the resolved file written beside a stage's outputs
RESOLVED_NAME = "ds_config.resolved.json"

PRECISIONS = ("fp16", "bf16", "fp32")
AUTO = "auto"

#: fp16 dynamic loss scaling set when a template has no fp16 block of its own (see ds_configs/README.md).
#: loss_scale 0 selects DeepSpeed's DynamicLossScaler; the scale starts at 2**initial_scale_power.
FP16_DYNAMIC_DEFAULTS = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


class DSConfigError(ConfigError):
    """A DeepSpeed config (template or arguments) is invalid; ``problems`` lists every problem.

    Subclasses :class:`pipeline.config.ConfigError` (a ``ValueError``), so a stage script that
    prints ConfigError cleanly and exits 2 handles it too.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        super().__init__(problems)
        head = f"invalid DeepSpeed config {source}" if source else "invalid DeepSpeed config"
        self.args = (head + ":\n  - " + "\n  - ".join(self.problems),)

    def __str__(self) -> str:
        return self.args[0]


# ---------------------------------------------------------------------------------------------
# allowed keys, built from DeepSpeed's own definitions


class _Opaque:
    """A section whose inner keys are not checked (free-form in DeepSpeed too)."""


OPAQUE = _Opaque()


def _model_schema(model: type) -> dict[str, Any]:
    """Allowed keys of a pydantic model (field names and aliases) -> schema of the value.

    Nested pydantic models (also inside ``Optional[...]``) become nested schemas; other fields are
    leaves (``None``).  Deprecated DeepSpeed fields map to ``("deprecated", new_name)``.
    """
    from pydantic import BaseModel

    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        sub: Any = None
        for tp in (f.annotation, *typing.get_args(f.annotation)):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                sub = _model_schema(tp)
                break
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("deprecated"):
            sub = ("deprecated", extra.get("new_param", ""))
        out[name] = sub
        for alias in (f.alias, f.validation_alias):
            if isinstance(alias, str):
                out[alias] = sub
    return out


def _adam_param_keys() -> set[str]:
    """Keyword arguments the Adam implementations DeepSpeed builds for ``"type": "AdamW"`` accept.

    DeepSpeed picks FusedAdam (GPU, or its CPU build), DeepSpeedCPUAdam (optimizer offload) or
    ``torch.optim.AdamW`` (``"torch_adam": true``) and passes ``optimizer.params`` as keyword
    arguments; it pops ``torch_adam``, ``adam_w_mode`` and ``fp32_optimizer_states`` itself
    (deepspeed/runtime/engine.py, ``get_optimizer_configuration``).
    """
    import torch

    keys = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
    ctors: list[Any] = [torch.optim.AdamW.__init__, torch.optim.Adam.__init__]
    try:  # importing the classes builds nothing; ops are compiled on first construction
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        ctors += [FusedAdam.__init__, DeepSpeedCPUAdam.__init__]
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass
    for ctor in ctors:
        for p in inspect.signature(ctor).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                keys.add(p.name)
    return keys - {"self", "params", "model_params"}


_SCHEMA: dict[str, Any] | None = None


def allowed_schema() -> dict[str, Any]:
    """The nested map of keys this resolver accepts (built once from DeepSpeed's definitions).

    Values: ``None`` (a leaf), a dict (a section, checked recursively), :data:`OPAQUE` (a section
    whose inner keys are free-form), or ``("deprecated", new_key)``.
    """
    global _SCHEMA
    if _SCHEMA is not None:
        return _SCHEMA
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.profiling import constants as prof_c
    from deepspeed.runtime import constants as c
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT, ACT_CHKPT_DEFAULT
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import TIMERS, TIMERS_THROUGHPUT, DeepSpeedThroughputTimerConfig

    # top-level scalar keys DeepSpeed reads from the raw dict (deepspeed/runtime/config.py,
    # DeepSpeedConfig._initialize_params); taken from its constants module so the spelling is its own
    scalar_constants = (
        "TRAIN_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE_PER_GPU", "GRADIENT_ACCUMULATION_STEPS",
        "STEPS_PER_PRINT", "GRADIENT_CLIPPING", "WALL_CLOCK_BREAKDOWN", "MEMORY_BREAKDOWN",
        "ZERO_ALLOW_UNTESTED_OPTIMIZER", "ZERO_FORCE_DS_CPU_OPTIMIZER", "PRESCALE_GRADIENTS",
        "GRADIENT_PREDIVIDE_FACTOR", "COMMUNICATION_DATA_TYPE", "DISABLE_ALLGATHER", "DUMP_STATE",
        "DATALOADER_DROP_LAST", "LOG_LEVEL", "DISABLE_PYTHON_GC",
    )
    schema: dict[str, Any] = {getattr(c, n): None for n in scalar_constants if hasattr(c, n)}
    schema.update({
        c.OPTIMIZER: {c.TYPE: None, c.OPTIMIZER_PARAMS: {k: None for k in _adam_param_keys()},
                      c.LEGACY_FUSION: None},
        "zero_optimization": _model_schema(DeepSpeedZeroConfig),
        "fp16": _model_schema(DeepSpeedFP16Config),
        "bf16": _model_schema(DeepSpeedBF16Config),
        "tensorboard": _model_schema(TensorBoardConfig),
        "wandb": _model_schema(WandbConfig),
        "csv_monitor": _model_schema(CSVConfig),
        "comet": _model_schema(CometConfig),
        "comms_logger": _model_schema(CommsLoggerConfig),
        "compile": _model_schema(CompileConfig),
        TIMERS: {TIMERS_THROUGHPUT: _model_schema(DeepSpeedThroughputTimerConfig)},
        ACT_CHKPT: {k: None for k in ACT_CHKPT_DEFAULT},
        prof_c.FLOPS_PROFILER: {getattr(prof_c, n): None for n in dir(prof_c)
                                if n.startswith("FLOPS_PROFILER_") and not n.endswith("_DEFAULT")},
        c.DATA_TYPES: OPAQUE,
        c.CHECKPOINT: OPAQUE,
    })
    _SCHEMA = schema
    return schema


# keys this pipeline refuses although DeepSpeed knows them, with the reason and the fix
_REFUSED_TOP = {
    "scheduler": "the training engine passes its own warmup+cosine LambdaLR to deepspeed.initialize "
                 "(and DeepSpeed 0.19 lets that client scheduler win, so a config scheduler would be "
                 "silently ignored); remove the 'scheduler' section and set the schedule in the stage config",
}


def _check_keys(node: dict, schema: dict, path: str, problems: list[str]) -> None:
    """Append one problem per unknown or deprecated key in ``node`` (recursively)."""
    for key, value in node.items():
        where = f"{path}.{key}" if path else key
        if not path and key in _REFUSED_TOP:
            problems.append(f"'{where}' is not allowed: {_REFUSED_TOP[key]}")
            continue
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            hint = f"did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else (
                "valid keys here: " + ", ".join(sorted(schema)))
            problems.append(f"unknown key '{where}' ({hint})")
            continue
        sub = schema[key]
        if isinstance(sub, tuple) and sub[0] == "deprecated":
            new = f"{path}.{sub[1]}" if path and sub[1] else sub[1]
            problems.append(f"'{where}' is deprecated in DeepSpeed; use '{new}' instead")
        elif isinstance(sub, dict):
            if isinstance(value, dict):
                _check_keys(value, sub, where, problems)
            elif value is not None and not (isinstance(value, bool) and key == "zero_optimization"):
                problems.append(f"'{where}' must be an object of keys, got {value!r}")


# ---------------------------------------------------------------------------------------------
# loading


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key '{k}'")
        seen[k] = v
    return seen


def _reject_constant(name: str) -> Any:
    raise ValueError(f"'{name}' is not valid strict JSON")


def find_template(template: str | Path) -> Path:
    """Path of a template: an existing path, or a name in ``ds_configs/`` (``"zero2_fp16"`` works).

    Raises:
        DSConfigError: when neither exists; the message lists the shipped templates.
    """
    p = Path(template)
    candidates = [p]
    if not p.is_absolute():
        candidates += [TEMPLATE_DIR.parent / p, TEMPLATE_DIR / p, TEMPLATE_DIR / f"{p}.json"]
    for c in candidates:
        if c.is_file():
            return c
    shipped = ", ".join(sorted(q.name for q in TEMPLATE_DIR.glob("*.json")))
    raise DSConfigError([f"DeepSpeed config file '{template}' does not exist; "
                         f"give a path or one of the templates in {TEMPLATE_DIR}: {shipped}"])


def load_template(template: str | Path | dict) -> tuple[dict, str]:
    """Read a template as strict JSON; return ``(config dict (a deep copy), source name)``.

    Strict: no comments, trailing commas, NaN/Infinity or duplicate keys.

    Raises:
        DSConfigError: missing file, or a parse error naming the file, line and column.
    """
    if isinstance(template, dict):
        return copy.deepcopy(template), "<dict>"
    path = find_template(template)
    text = path.read_text()
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise DSConfigError([f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg} "
                             "(strict JSON: no comments, no trailing commas)"]) from None
    except ValueError as e:
        raise DSConfigError([f"{path}: {e}"]) from None
    if not isinstance(data, dict):
        raise DSConfigError([f"{path}: the top level must be a JSON object, got {type(data).__name__}"])
    return data, str(path)


# ---------------------------------------------------------------------------------------------
# resolving


def _check_arguments(micro_batch_size, grad_accum, world_size, lr, weight_decay, betas, eps, grad_clip,
                     precision, zero_stage) -> list[str]:
    problems = []
    for name, v in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                    ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{name} must be an integer >= 1, got {v!r}")

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not num(lr) or lr <= 0:
        problems.append(f"lr must be a number > 0, got {lr!r}")
    if not num(weight_decay) or weight_decay < 0:
        problems.append(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not num(eps) or eps <= 0:
        problems.append(f"eps must be a number > 0, got {eps!r}")
    if not num(grad_clip) or grad_clip < 0:
        problems.append(f"grad_clip must be a number >= 0 (0 turns clipping off), got {grad_clip!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(num(b) and 0 <= b < 1 for b in betas)):
        problems.append(f"betas must be two numbers in [0, 1), got {betas!r}")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)} (resolve 'auto' with "
                        f"resolve_precision first), got {precision!r}")
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage must be 0, 1, 2 or 3 (or None to keep the template's), got {zero_stage!r}")
    return problems


def _fill(node: dict, key: str, value: Any, where: str, what: str, problems: list[str]) -> None:
    """Set ``node[key]`` to ``value`` when absent or "auto"; an explicit different value is a problem."""
    have = node.get(key, AUTO)
    if have == AUTO:
        node[key] = value
        return
    same = (list(have) == list(value)) if isinstance(value, list) and isinstance(have, list) else (
        isinstance(have, (int, float)) and not isinstance(have, bool) and math.isclose(have, value))
    if not same:
        problems.append(f"'{where}' is {have!r} in the template but the run sets {what} = {value!r}; "
                        f"set it to \"auto\" (filled from the stage config) or make them agree")


def _find_autos(node: Any, path: str, out: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _find_autos(v, f"{path}.{k}" if path else k, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _find_autos(v, f"{path}[{i}]", out)
    elif node == AUTO:
        out.append(path)


def _validate_with_deepspeed(cfg: dict, problems: list[str]) -> None:
    """Check section values with DeepSpeed's own pydantic models (types, ranges, model validators)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config),
                       ("bf16", DeepSpeedBF16Config)):
        section = cfg.get(key)
        if not isinstance(section, dict):
            continue
        try:
            model(**section)
        except ValidationError as e:
            for err in e.errors():
                if err.get("type") == "extra_forbidden":
                    continue  # already reported by name, with a suggestion
                loc = ".".join(str(x) for x in err.get("loc", ()))
                problems.append(f"'{key}{'.' + loc if loc else ''}': {err.get('msg')} "
                                f"(got {err.get('input')!r})")
        except (AssertionError, ValueError, TypeError) as e:
            problems.append(f"'{key}': {e}")


def resolve_ds_config(
    template: str | Path | dict,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    grad_clip: float,
    precision: str,
    zero_stage: int | None = None,
) -> dict:
    """Fill a DeepSpeed config template for one run and check it; return the config to use.

    Args:
        template: a path (or a template name in ``ds_configs/``, e.g. ``"zero2_fp16"``), or a dict
            (deep-copied, never modified).
        micro_batch_size: sequences per rank per forward/backward (``train_micro_batch_size_per_gpu``).
        grad_accum: micro-batches per optimizer step (``gradient_accumulation_steps``).
        world_size: number of data-parallel ranks.
        lr, weight_decay, betas, eps: AdamW hyper-parameters (``optimizer.params``); ``lr`` is the peak
            learning rate the engine's LambdaLR multiplies.
        grad_clip: global gradient-norm clip (``gradient_clipping``); 0 turns clipping off.
        precision: ``"fp16"`` (fp16 on, with the template's dynamic loss scaling keys, or
            :data:`FP16_DYNAMIC_DEFAULTS` where it has none; bf16 off), ``"bf16"`` (bf16 on, fp16 off)
            or ``"fp32"`` (both off).  Resolve ``"auto"`` with :func:`resolve_precision` first.
        zero_stage: replaces ``zero_optimization.stage`` when given.

    Returns:
        A new dict with no ``"auto"`` left, where ``train_batch_size == micro_batch_size * grad_accum
        * world_size`` (DeepSpeed's own check, deepspeed/runtime/config.py ``_batch_assertion``) and
        ``betas`` is a JSON list.

    Raises:
        DSConfigError: listing every problem at once: a parse error (file, line, column), unknown or
            misspelled keys at any depth (with the closest valid key), a deprecated key, a
            ``scheduler`` section, explicit numbers that disagree with the arguments (for
            ``train_batch_size``: naming the three factors), an ``"auto"`` this resolver cannot fill,
            ``offload_param`` without ZeRO stage 3, values DeepSpeed's config models reject, and bad
            arguments.
    """
    cfg, source = load_template(template)
    problems = _check_arguments(micro_batch_size, grad_accum, world_size, lr, weight_decay, betas, eps,
                                grad_clip, precision, zero_stage)
    bad = {p.split(" ", 1)[0] for p in problems}  # names of the arguments with a problem
    _check_keys(cfg, allowed_schema(), "", problems)

    # --- batch arithmetic
    if not bad & {"micro_batch_size", "grad_accum", "world_size"}:
        _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "train_micro_batch_size_per_gpu",
              "micro_batch_size", problems)
        _fill(cfg, "gradient_accumulation_steps", grad_accum, "gradient_accumulation_steps", "grad_accum",
              problems)
        total = micro_batch_size * grad_accum * world_size
        have = cfg.get("train_batch_size", AUTO)
        if have == AUTO:
            cfg["train_batch_size"] = total
        elif have != total:
            problems.append(
                f"'train_batch_size' is {have!r} but micro_batch_size ({micro_batch_size}) x grad_accum "
                f"({grad_accum}) x world_size ({world_size}) = {total} (world size from {_world_source()}); set "
                "it to \"auto\" or change one of the three factors")
    if "grad_clip" not in bad:
        _fill(cfg, "gradient_clipping", grad_clip, "gradient_clipping", "grad_clip", problems)

    # --- optimizer
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict):
        problems.append("no 'optimizer' section: add {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\", "
                        "\"betas\": \"auto\", \"eps\": \"auto\", \"weight_decay\": \"auto\"}}")
    else:
        if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            problems.append(f"'optimizer.type' is {opt.get('type')!r}; this pipeline trains with \"AdamW\" "
                            "(DeepSpeed builds FusedAdam, DeepSpeedCPUAdam when offloaded, or torch AdamW)")
        params = opt.setdefault("params", {})
        if not isinstance(params, dict):
            problems.append(f"'optimizer.params' must be an object, got {params!r}")
        else:
            for key, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
                if key not in bad:
                    _fill(params, key, value, f"optimizer.params.{key}", key, problems)
            if "betas" not in bad:
                _fill(params, "betas", [float(b) for b in betas], "optimizer.params.betas", "betas", problems)

    # --- precision: exactly one of fp16/bf16 on (or none for fp32)
    if precision in PRECISIONS:
        fp16 = cfg.get("fp16") if isinstance(cfg.get("fp16"), dict) else {}
        bf16 = cfg.get("bf16") if isinstance(cfg.get("bf16"), dict) else {}
        fp16["enabled"] = precision == "fp16"
        bf16["enabled"] = precision == "bf16"
        if precision == "fp16":
            for k, v in FP16_DYNAMIC_DEFAULTS.items():
                fp16.setdefault(k, v)
        cfg["fp16"], cfg["bf16"] = fp16, bf16

    # --- ZeRO
    zero = cfg.setdefault("zero_optimization", {})
    if isinstance(zero, dict):
        if zero_stage is not None:
            zero["stage"] = zero_stage
        stage = zero.get("stage", 0)
        off_p = zero.get("offload_param")
        if isinstance(off_p, dict) and off_p.get("device", "none") != "none" and stage != 3:
            problems.append(f"'zero_optimization.offload_param' offloads parameters, which only ZeRO stage 3 "
                            f"can do, but the stage is {stage}; use a zero3 template or remove offload_param")

    autos: list[str] = []
    _find_autos(cfg, "", autos)
    for where in autos:
        problems.append(f"'{where}' is \"auto\" but the resolver fills only batch sizes, gradient_clipping and "
                        "optimizer.params lr/betas/eps/weight_decay; give a number")
    if not autos:
        _validate_with_deepspeed(cfg, problems)
    if problems:
        raise DSConfigError(list(dict.fromkeys(problems)), source)
    return cfg


def write_resolved(cfg: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/ds_config.resolved.json`` (rank 0 only, atomically); return its path on every rank.

    Creates ``out_dir`` if needed.  Other ranks write nothing and return the same path.

    Raises:
        DSConfigError: ``cfg`` is not JSON-serialisable or still holds an ``"auto"``.
    """
    path = Path(out_dir) / RESOLVED_NAME
    autos: list[str] = []
    _find_autos(cfg, "", autos)
    if autos:
        raise DSConfigError([f"'{a}' is still \"auto\": resolve the config with resolve_ds_config first"
                             for a in autos])
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DSConfigError([f"the resolved config is not strict JSON: {e}"]) from None
    if dist.is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cfg)
    return path


def resolve_precision(requested: str, device_type: str) -> tuple[str, str | None]:
    """Turn ``--precision`` into the precision a device can train in.

    Args:
        requested: ``"auto"``, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        device_type: ``torch.device(...).type`` of the training device, e.g. ``"cuda"`` or ``"cpu"``
            (DeepSpeed's CPU accelerator, ``DS_ACCELERATOR=cpu``).

    Returns:
        ``(precision, message)``: ``auto`` gives ``fp16`` (with DeepSpeed's dynamic loss scaling) on
        CUDA, ``fp32`` on a CPU without native bf16 (:func:`cpu_has_native_bf16`) and ``bf16`` elsewhere, where ``message`` is the one line to log about the fallback;
        ``message`` is ``None`` when nothing was changed.

    Raises:
        DSConfigError: an unknown value; ``fp16`` on a non-CUDA device (DeepSpeed's CPU accelerator
            refuses it: "Type fp16 is not supported on your device"); ``bf16`` on a GPU without bf16.
    """
    if requested not in ("auto", *PRECISIONS):
        raise DSConfigError([f"precision must be one of auto, fp16, bf16, fp32, got {requested!r}"])
    if requested == "auto":
        if device_type == "cuda":
            return "fp16", None
        if device_type == "cpu" and not cpu_has_native_bf16():
            return "fp32", (f"precision auto: fp16 cannot run on DeepSpeed's {device_type} accelerator, and this "
                            "CPU has no native bf16 (no AVX-512 BF16 or AMX: bf16 matmuls are emulated, several "
                            "times slower than fp32); using fp32 (--precision bf16 forces bf16)")
        return "bf16", (f"precision auto: fp16 cannot run on DeepSpeed's {device_type} accelerator; "
                        "using bf16 (no loss scaling needed)")
    if requested == "fp16" and device_type != "cuda":
        raise DSConfigError([f"precision fp16 cannot run on the {device_type} device (DeepSpeed's "
                             f"{device_type} accelerator has no fp16); use --precision bf16 or fp32 "
                             "(or auto, which picks bf16 there)"])
    if requested == "bf16" and device_type == "cuda":
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise DSConfigError(["precision bf16 is not supported by this GPU; use --precision fp16 or auto"])
    return requested, None


def adapt_to_device(cfg: dict, device_type: str) -> dict:
    """The resolved config adapted to the device; pass the result to ``deepspeed.initialize``.

    On CUDA nothing changes: DeepSpeed builds FusedAdam for ``"type": "AdamW"`` (DeepSpeedCPUAdam
    when the optimizer is offloaded), and DeepCompile runs where the config turns it on.  Elsewhere:

    - without optimizer offload, ``optimizer.params.torch_adam = true``, so DeepSpeed builds
      ``torch.optim.AdamW`` (same AdamW update) instead of JIT-compiling its C++ CPU FusedAdam, which took
      135 s on a 2-core machine on first use (it is cached in ~/.cache/torch_extensions afterwards).  With
      optimizer offload that is left alone: DeepSpeed requires its DeepSpeedCPUAdam there
      (``zero_force_ds_cpu_optimizer``);
    - ``compile.deepcompile`` is set false: DeepCompile is CUDA-only (``deepspeed.compile.util.
      is_deepcompile_supported``), and with it on, ``engine.compile()`` on DeepSpeed's CPU accelerator fails
      while building DeepCompile's C++ op ("cuda.h: No such file or directory", seen with ``--compile on``).

    Args:
        cfg: a config returned by :func:`resolve_ds_config` (not modified).
        device_type: ``"cuda"``, ``"cpu"``, ...

    Returns:
        A new dict.
    """
    out = copy.deepcopy(cfg)
    if device_type == "cuda":
        return out
    opt = out.get("optimizer")
    offload = (out.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if device_type == "cpu" and isinstance(opt, dict) and offload.get("device", "none") == "none":
        opt.setdefault("params", {})["torch_adam"] = True
    if isinstance(out.get("compile"), dict) and out["compile"].get("deepcompile"):
        out["compile"]["deepcompile"] = False
    return out


def templates() -> list[Path]:
    """The shipped templates (``ds_configs/*.json``), sorted by name."""
    return sorted(TEMPLATE_DIR.glob("*.json"))


def template_from_env(default: str | Path | None = None) -> str | Path | None:
    """The template ``accelerate launch --config_file ds_configs/accelerate/*.yaml`` points at.

    Accelerate exports the yaml's ``deepspeed_config_file`` as ``ACCELERATE_DEEPSPEED_CONFIG_FILE``;
    returns it, else ``default``.
    """
    v = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return v if v and v != "none" else default


def _world_source() -> str:
    from pipeline import dist

    return dist.world_size_source()
