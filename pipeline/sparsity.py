"""Weight masks for unstructured and N:M pruning: made by stage 03, kept by stage 04, checked by stage 05.

A *mask* is a bool tensor of a weight's full shape, ``True`` = kept; a *mask set* maps parameter names
(as in ``model.named_parameters()`` / ``model.state_dict()``) to masks.  On disk a mask set is one
safetensors file of ``uint8`` tensors (1 = kept), the layout of ``masks.safetensors`` in the stage-03
contract.

Criteria (the baselines the pruned models are compared with):

- **magnitude**, layer scope: in each weight matrix the ``floor(s · numel)`` entries of smallest ``|w|``
  are removed, as the magnitude baseline of Wanda (Sun et al., 2023, "A Simple and Effective Pruning
  Approach for LLMs", ``prune_magnitude``) and SparseGPT (Frantar & Alistarh, 2023);
- **magnitude**, global scope: one threshold over all selected matrices together (Han et al., 2015,
  "Learning both Weights and Connections");
- **N:M**: in every group of M consecutive weights along the input dimension the N of largest ``|w|``
  are kept (2:4 is the pattern sparse tensor cores accelerate: Mishra et al., 2021, "Accelerating
  Sparse Deep Neural Networks").

"Input dimension" is the weight's dimension that indexes input features: 1 for ``nn.Linear`` and
``nn.Embedding`` (``(out, in)``), 0 for GPT-2's ``Conv1D`` (``(in, out)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # noqa: N816


@dataclass(frozen=True)
class PrunableWeight:
    """One weight matrix that pruning may act on.

    Attributes:
        name: the parameter's name in ``model.named_parameters()`` (tied weights: the first name).
        aliases: every name the parameter has (tied weights have several, e.g. ``lm_head.weight``).
        param: the parameter itself, 2-D.
        in_dim: the dimension of ``param`` that indexes input features (1 for ``nn.Linear``, 0 for ``Conv1D``).
    """

    name: str
    aliases: tuple[str, ...]
    param: nn.Parameter
    in_dim: int

    @property
    def in_width(self) -> int:
        """Number of input features (the length of the dimension N:M groups run along)."""
        return int(self.param.shape[self.in_dim])


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(qualified name, module list)`` of the model's transformer blocks, or ``None`` when its architecture is
    not in :mod:`pipeline.architectures` (``model.layers`` in LLaMA, ``transformer.h`` in GPT-2,
    ``bert.encoder.layer`` in BERT)."""
    from pipeline import architectures

    arch = architectures.find(model)
    return arch.blocks_of(model) if arch is not None else None


def _candidates(model: nn.Module) -> dict[str, PrunableWeight]:
    """Every 2-D weight of an ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``, keyed by parameter name."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out: dict[str, PrunableWeight] = {}
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            in_dim = 1
        elif Conv1D and isinstance(mod, Conv1D):
            in_dim = 0
        else:
            continue
        w = mod.weight
        if w.dim() != 2 or id(w) not in aliases:
            continue
        names = aliases[id(w)]
        out.setdefault(names[0], PrunableWeight(names[0], tuple(names), w, in_dim))
    return out


def prunable_weights(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> dict[str, PrunableWeight]:
    """The weights a pruning method acts on, keyed by parameter name, in model order.

    Args:
        model: a ``transformers`` model of an architecture in :mod:`pipeline.architectures` (any model with
            ``include`` patterns).
        include: regular expressions (``re.search``) over parameter names, any alias of a tied weight
            counting; a weight is selected when one matches.  Candidates are the 2-D weights of
            ``nn.Linear``, ``Conv1D`` and ``nn.Embedding`` modules.  Empty: the linear (``nn.Linear`` /
            ``Conv1D``) weights inside the decoder blocks, so embeddings, the LM head and norms stay dense.
        exclude: regular expressions removing weights from the selection.

    Raises:
        ValueError: listing every problem: a pattern that is not a valid regular expression, an
            ``include`` pattern that matches no candidate, decoder blocks that cannot be found (with no
            ``include``), or an empty selection.
    """
    include, exclude = list(include), list(exclude)
    problems = []
    compiled: dict[str, re.Pattern] = {}
    for pat in include + exclude:
        try:
            compiled[pat] = re.compile(pat)
        except re.error as e:
            problems.append(f"pattern '{pat}' is not a valid regular expression ({e})")
    if problems:
        raise ValueError("; ".join(problems))
    cands = _candidates(model)

    def hits(pw: PrunableWeight, pat: str) -> bool:
        return any(compiled[pat].search(a) for a in pw.aliases)

    if include:
        selected = {k: pw for k, pw in cands.items() if any(hits(pw, p) for p in include)}
        for pat in include:
            if not any(hits(pw, pat) for pw in cands.values()):
                problems.append(f"include pattern '{pat}' matches no Linear/Conv1D/Embedding weight "
                                f"(candidates look like '{next(iter(cands), '?')}')")
    else:
        blocks = decoder_blocks(model)
        if blocks is None:
            from pipeline import architectures

            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(f"{type(model).__name__}: cannot find its decoder blocks (architecture '{model_type}' "
                             f"is not in pipeline/architectures.py, registered: {', '.join(architectures.names())}); "
                             f"register it or select weights with --include patterns")
        prefix = blocks[0] + "."
        selected = {k: pw for k, pw in cands.items()
                    if k.startswith(prefix) and not isinstance(_owner(model, k), nn.Embedding)}
    selected = {k: pw for k, pw in selected.items() if not any(hits(pw, p) for p in exclude)}
    if not selected and not problems:
        problems.append(f"no weight left to prune in {type(model).__name__} (include={include or 'default'}, "
                        f"exclude={exclude}); loosen --exclude or widen --include")
    if problems:
        raise ValueError("; ".join(problems))
    return selected


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


# ---------------------------------------------------------------------------------------------
# masks


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``floor(sparsity · numel)`` entries of smallest ``|w|`` (ties: lower index first
    as ``torch.topk`` returns them).  Returns a bool tensor of ``weight``'s shape.

    Raises:
        ValueError: for ``sparsity`` outside ``[0, 1)``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    k = int(sparsity * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        mask[torch.topk(weight.detach().abs().flatten().float(), k, largest=False).indices] = False
    return mask.view(weight.shape)


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks with one ``|w|`` threshold over all ``weights`` together, removing exactly
    ``floor(sparsity · total)`` entries (entries equal to the threshold are removed in concatenation order
    until the count is reached).  The layers end up with different sparsities.

    Memory: one fp32 copy of all selected weights (about 1.4 GB for 350M weights).

    Raises:
        ValueError: for ``sparsity`` outside ``[0, 1)`` or no weights.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if not weights:
        raise ValueError("no weights given")
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().flatten().float().cpu() for n in names])
    k = int(sparsity * flat.numel())
    removed = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        thr = torch.kthvalue(flat, k).values
        removed = flat < thr
        need = k - int(removed.sum())
        removed[(flat == thr).nonzero().flatten()[:need]] = True
    del flat
    out, start = {}, 0
    for n in names:
        w = weights[n]
        out[n] = (~removed[start:start + w.numel()]).view(w.shape).to(w.device)
        start += w.numel()
    return out


def _as_out_in(t: torch.Tensor, in_dim: int) -> torch.Tensor:
    if in_dim not in (0, 1) or t.dim() != 2:
        raise ValueError(f"expected a 2-D weight and in_dim 0 or 1, got shape {tuple(t.shape)}, in_dim {in_dim}")
    return t if in_dim == 1 else t.t()


def nm_mask(weight: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive weights along ``in_dim`` the ``n`` of largest
    ``|w|`` are kept.  Returns a bool tensor of ``weight``'s shape (sparsity exactly ``1 - n/m``).

    Raises:
        ValueError: when ``not 0 < n < m`` or the input width is not a multiple of ``m``.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got N={n}, M={m}")
    w = _as_out_in(weight.detach(), in_dim)
    rows, width = w.shape
    if width % m:
        raise ValueError(f"input width {width} is not a multiple of M={m}")
    groups = w.abs().float().reshape(rows, width // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    keep = keep.reshape(rows, width)
    return keep if in_dim == 1 else keep.t().contiguous()


def check_nm(weight: torch.Tensor, n: int, m: int, in_dim: int = 1) -> bool:
    """True when every group of ``m`` consecutive weights along ``in_dim`` has at most ``n`` non-zeros.

    Raises:
        ValueError: when the input width is not a multiple of ``m``.
    """
    w = _as_out_in(weight.detach(), in_dim)
    rows, width = w.shape
    if width % m:
        raise ValueError(f"input width {width} is not a multiple of M={m}")
    return bool(((w != 0).reshape(rows, width // m, m).sum(-1) <= n).all())


def compute_masks(
    model: nn.Module,
    method: Literal["magnitude", "nm"],
    sparsity: float = 0.5,
    scope: Literal["layer", "global"] = "layer",
    n: int = 2,
    m: int = 4,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Keep-masks for the weights :func:`prunable_weights` selects; the model is not changed.

    Args:
        method: ``magnitude`` (``sparsity`` per ``scope``) or ``nm`` (``n`` kept of every ``m``).
        sparsity: fraction of weights removed, in ``[0, 1)``; unused by ``nm`` (``1 - n/m``).
        scope: ``layer`` (each matrix to ``sparsity``) or ``global`` (one threshold over all).

    Returns:
        parameter name -> bool mask of the weight's shape, ``True`` = kept.

    Raises:
        ValueError: a bad selection (see :func:`prunable_weights`), ratio, N:M or width.
    """
    selected = prunable_weights(model, include, exclude)
    if method == "magnitude":
        if scope == "global":
            return global_magnitude_masks({k: pw.param for k, pw in selected.items()}, sparsity)
        if scope != "layer":
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        return {k: magnitude_mask(pw.param, sparsity) for k, pw in selected.items()}
    if method == "nm":
        return {k: nm_mask(pw.param, n, m, pw.in_dim) for k, pw in selected.items()}
    raise ValueError(f"method must be 'magnitude' or 'nm', got {method!r}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set every weight entry whose mask is 0 to exactly ``+0.0``, in place.

    Raises:
        ValueError: listing every mask that names no parameter of ``model`` or whose shape differs from
            the weight's; nothing is changed then.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    problems = [f"mask '{k}' names no parameter of the model" for k in masks if k not in params]
    problems += [f"mask '{k}' has shape {tuple(v.shape)}, the weight {tuple(params[k].shape)}"
                 for k, v in masks.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    if problems:
        raise ValueError("masks do not fit the model:\n  - " + "\n  - ".join(problems))
    for k, v in masks.items():
        p = params[k]
        p.masked_fill_(~v.to(device=p.device, dtype=torch.bool), 0.0)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write masks as one safetensors file of ``uint8`` tensors (1 = kept)."""
    from safetensors.torch import save_file

    save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in masks.items()}, str(path),
              metadata={"format": "pt", "content": "pruning keep-masks, 1 = kept"})


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a mask file written by :func:`save_masks` as parameter name -> bool tensor (``True`` = kept).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    return {k: v.to(torch.bool) for k, v in load_file(str(path)).items()}


@torch.no_grad()
def sparsity_report(model: nn.Module, names: Iterable[str]) -> dict:
    """Measured sparsity (fraction of entries exactly 0) of the named parameters of ``model``.

    Args:
        names: parameter names, e.g. a mask set (its keys) or :func:`prunable_weights`.

    Returns:
        ``{"layers": {name: fraction}, "zeros": int, "numel": int, "overall": zeros / numel}``.

    Raises:
        KeyError: a name that is no parameter of ``model``.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    layers, zeros, numel = {}, 0, 0
    for k in names:
        p = params[k]
        z = p.numel() - int(torch.count_nonzero(p))
        layers[k] = z / p.numel()
        zeros += z
        numel += p.numel()
    return {"layers": layers, "zeros": zeros, "numel": numel, "overall": zeros / numel if numel else 0.0}


def count_mask_violations(state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per masked tensor, how many weights are nonzero where the mask says pruned (0 everywhere = kept).

    Args:
        state_dict: name -> full weight (e.g. a reloaded export, ``safetensors.torch.load_file``).
        masks: name -> bool/uint8 mask of the same shape, nonzero = kept.

    Returns:
        name -> count of violations (only names present in both).

    Raises:
        ValueError: when a mask names a tensor missing from ``state_dict`` or of another shape.
    """
    out: dict[str, int] = {}
    for name, m in masks.items():
        if name not in state_dict:
            raise ValueError(f"mask '{name}' has no tensor in the state dict")
        w = state_dict[name]
        if tuple(w.shape) != tuple(m.shape):
            raise ValueError(f"mask '{name}' has shape {tuple(m.shape)}, the tensor {tuple(w.shape)}")
        out[name] = int(((w != 0) & ~m.to(torch.bool).to(w.device)).sum())
    return out


def load_export_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory's ``*.safetensors`` files (shards included), on CPU."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        from pipeline.manifest import StageError

        raise StageError(f"{model_dir} holds no *.safetensors weights")
    return out
