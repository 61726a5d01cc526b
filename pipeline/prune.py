"""Stage 03: one-shot magnitude pruning of the stage-02 model, before any recovery training.

Three methods, chosen with ``--method``:

- ``magnitude``: unstructured, by ``|w|``, per layer or with one global threshold
  (:func:`pipeline.sparsity.compute_masks`);
- ``nm``: N:M semi-structured (2:4 by default) along the input dimension;
- ``structured``: width pruning of LLaMA models (:func:`prune_llama_width`): whole attention heads (with
  grouped-query attention, whole key/value groups together with their query heads) and MLP intermediate
  channels, the same number in every decoder block, ranked by group magnitude (torch-pruning's
  ``GroupMagnitudeImportance(p=2)``, the criterion of its LLM example); the hidden size is kept, as in
  NVIDIA's Minitron width pruning of heads and MLP channels (Muralidharan et al., 2024, "Compact Language
  Models via Pruning and Knowledge Distillation").  The result is a plain ``LlamaForCausalLM`` whose config
  records the new sizes.

``--importance`` replaces the magnitude ranking with an activation-aware one computed on calibration blocks of
the training split (:mod:`pipeline.calibration`, :mod:`pipeline.importance`): ``wanda`` for magnitude/nm
(Sun et al., 2023), ``activation`` for structured (Minitron's head and MLP-channel importance); ``--drop_layers``
removes whole decoder blocks of lowest Block Influence before width pruning (ShortGPT, Men et al., 2024).

The stage's entry point is ``scripts/prune.py``; this module holds its configuration and the pieces, and
registers the three methods with :mod:`pipeline.prune_methods` (at its end), where every method-dependent rule is
looked up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline import architectures
from pipeline.architectures import Architecture
from pipeline.config import CommonConfig, doc
from pipeline.prune_methods import PruneMethod, get, method_names, register
from pipeline.sparsity import apply_masks, compute_masks, prunable_weights, sparsity_report


def structured_archs() -> tuple[str, ...]:
    """The ``model_type`` values structured pruning supports: the :mod:`pipeline.architectures` entries marked
    ``width_prunable`` (it edits the module layout, so support is explicit)."""
    return tuple(n for n, a in architectures.ARCHITECTURES.items() if a.width_prunable)


@dataclass
class PruneConfig(CommonConfig):
    """Stage 03: prune the stage-02 model and measure it right after pruning."""

    # the registered methods (pipeline.prune_methods), resolved when the configuration is parsed
    method: Literal[method_names()] = doc(
        "magnitude: unstructured by |w|; nm: N:M semi-structured along the input dimension; structured: "
        "remove whole attention heads (key/value groups) and MLP channels of a LLaMA model.", "magnitude")
    sparsity: float = doc(
        "Fraction removed, in [0, 1): of the selected weights (magnitude), or of the key/value groups and MLP "
        "channels of every block (structured, unless head_ratio/mlp_ratio are set). nm ignores it (1 - n/m).",
        0.5)
    scope: Literal["layer", "global"] = doc(
        "magnitude only: 'layer' prunes each matrix to the target; 'global' uses one |w| threshold for all.",
        "layer")
    n: int = doc("nm: weights kept in every group of m (N of N:M).", 2)
    m: int = doc("nm: group length along the input dimension (M of N:M).", 4)
    include: list[str] = doc(
        "magnitude/nm: regular expressions over parameter names selecting the weights to prune (Linear, "
        "Conv1D or Embedding weights); empty = the linear layers of the decoder blocks.", default_factory=list)
    exclude: list[str] = doc("magnitude/nm: regular expressions removing weights from the selection.",
                             default_factory=list)
    head_ratio: float | None = doc(
        "structured: fraction of key/value groups (each with its query heads) removed per block; "
        "must be k / num_key_value_heads; unset = sparsity.", None)
    mlp_ratio: float | None = doc(
        "structured: fraction of MLP intermediate channels removed per block; unset = sparsity.", None)
    structured_backend: Literal["auto", "torch_pruning", "manual"] = doc(
        "structured: 'torch_pruning' runs torch-pruning on each block's attention and MLP (multi-head "
        "attention only: its graph never finishes on grouped-query attention); 'manual' ranks and slices the "
        "same groups here; 'auto' picks torch_pruning for multi-head attention, manual otherwise.", "auto")
    eval_batch_size: int = doc("Blocks per forward pass when measuring validation loss.", 8, run_control=True)
    eval_tokens: int = doc("Validation tokens scored before and after pruning (0 = the whole split).", 0)
    device: Literal["auto", "cpu", "cuda"] = doc("Where to prune and evaluate; auto = cuda when available.", "auto",
                                                 run_control=True)
    importance: Literal["magnitude", "wanda", "activation"] = doc(
        "How weights are ranked. magnitude: |w| (magnitude/nm) or group magnitude (structured); wanda "
        "(magnitude/nm): |w_ij|·||x_j||_2 over calibration tokens, compared per output row (Sun et al., 2023); "
        "activation (structured): head and MLP-channel importance from calibration activations (Minitron, "
        "Muralidharan et al., 2024). See pipeline/importance.py.", "magnitude")
    calib_blocks: int = doc(
        "wanda/activation/drop_layers: calibration blocks of seq_len tokens drawn (seeded) from the TRAINING "
        "split; the validation split is never read for calibration.", 128)
    calib_order: Literal["sequential", "one_pass"] = doc(
        "wanda: 'sequential' records each block's inputs with the blocks before it already pruned (one pass per "
        "block, Wanda's reference code); 'one_pass' records every input from the dense model at once.",
        "sequential")
    drop_layers: int = doc(
        "structured: whole decoder blocks removed first, those of lowest Block Influence 1 - cos(x_in, x_out) on "
        "the calibration blocks (ShortGPT, Men et al., 2024); 0 = none. With --sparsity 0 only depth is pruned.",
        0)

    def validate(self) -> list[str]:
        """Every problem found without the model (ranges, N:M, patterns); the model's are in :func:`check_model`."""
        import re

        problems = []
        if not 0.0 <= self.sparsity < 1.0:
            problems.append(f"sparsity {self.sparsity} is outside [0, 1): give the fraction of weights removed, "
                            f"e.g. --sparsity 0.5")
        for key in ("head_ratio", "mlp_ratio"):
            v = getattr(self, key)
            if v is not None and not 0.0 <= v < 1.0:
                problems.append(f"{key} {v} is outside [0, 1): give the fraction removed, e.g. --{key} 0.5")
        try:
            problems += get(self.method).validate(self)
        except KeyError as e:
            problems.append(str(e.args[0]))
        for pat in self.include + self.exclude:
            try:
                re.compile(pat)
            except re.error as e:
                problems.append(f"include/exclude pattern '{pat}' is not a valid regular expression ({e})")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.eval_tokens < 0:
            problems.append(f"eval_tokens must be 0 (whole split) or positive, got {self.eval_tokens}")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("--device cuda, but CUDA is not available here; use --device auto or cpu")
        problems += self._importance_problems()
        return problems

    def _importance_problems(self) -> list[str]:
        """Problems of calibration settings (part of :meth:`validate`; which importance fits which method is the
        method's :attr:`~pipeline.prune_methods.PruneMethod.validate`)."""
        problems = []
        if self.importance == "activation" and self.structured_backend == "torch_pruning":
            problems.append("--importance activation slices the ranked groups itself; use --structured_backend "
                            "auto or manual")
        if self.calib_blocks < 1:
            problems.append(f"calib_blocks must be at least 1, got {self.calib_blocks}")
        if self.drop_layers < 0:
            problems.append(f"drop_layers must be >= 0, got {self.drop_layers}")
        return problems

    def needs_calibration(self) -> bool:
        """True when pruning reads calibration blocks of the training split (the method decides)."""
        return get(self.method).needs_calibration(self)

    def ratios(self) -> tuple[float, float]:
        """(head_ratio, mlp_ratio) of structured pruning, ``sparsity`` standing in for the unset ones."""
        return (self.sparsity if self.head_ratio is None else self.head_ratio,
                self.sparsity if self.mlp_ratio is None else self.mlp_ratio)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


# ---------------------------------------------------------------------------------------------
# checks against the model


@dataclass(frozen=True)
class WidthPlan:
    """Sizes of a LLaMA model before and after width pruning (per decoder block; hidden size kept)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    new_attention_heads: int
    new_key_value_heads: int
    new_intermediate_size: int


def head_dim_of(config: Any) -> int:
    """The attention head width of a LLaMA config (``head_dim``, else ``hidden_size / heads``)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def set_sizes(config: Any, heads: int, kv_heads: int, intermediate: int, head_dim: int) -> None:
    """Write the sizes of a width-pruned LLaMA into ``config`` (``head_dim`` explicit: it no longer equals
    ``hidden_size / num_attention_heads``)."""
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = intermediate
    config.head_dim = head_dim


def config_refusal(config: Any, heads: int, kv_heads: int, intermediate: int) -> str | None:
    """Why ``transformers`` would refuse ``config`` with these sizes (``None`` when it accepts them).

    transformers 5 validates configs on save and load; ``LlamaConfig`` there requires ``hidden_size`` to be a
    multiple of ``num_attention_heads`` even when ``head_dim`` is given, so some head counts cannot be saved.
    """
    import copy

    c = copy.deepcopy(config)
    set_sizes(c, heads, kv_heads, intermediate, head_dim_of(config))
    validate = getattr(c, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # noqa: BLE001 - transformers raises several types; the message is what counts
            return str(e).strip().splitlines()[-1].strip()
    return None


def width_plan(config: Any, head_ratio: float, mlp_ratio: float) -> tuple[WidthPlan | None, list[str]]:
    """The sizes width pruning with these ratios gives a LLaMA ``config``, and every problem with them.

    Key/value groups removed: ``head_ratio · num_key_value_heads``, which must be a whole number (a group is
    one key/value head and the ``num_attention_heads / num_key_value_heads`` query heads sharing it; with
    multi-head attention a group is one head), and leave a head count the installed ``transformers`` accepts
    (:func:`config_refusal`).  MLP channels kept: ``floor(intermediate_size · (1 - mlp_ratio))``
    (torch-pruning's rounding), at least 1.

    Returns:
        (plan, []) or (None, problems); a head-ratio problem lists the ratios that work.
    """
    problems = []
    if getattr(config, "model_type", None) not in structured_archs():
        problems.append(f"structured pruning supports {', '.join(structured_archs())} (LlamaForCausalLM) models; "
                        f"this one is '{getattr(config, 'model_type', '?')}': use --method magnitude or nm")
        return None, problems
    heads, kv, ff = int(config.num_attention_heads), int(config.num_key_value_heads), int(config.intermediate_size)
    r = heads // kv
    usable = [i for i in range(kv) if config_refusal(config, (kv - i) * r, kv - i, ff) is None]
    choices = ", ".join(f"{i}/{kv}={i / kv:g}" for i in usable)
    removed = head_ratio * kv
    if abs(removed - round(removed)) > 1e-6 or round(removed) >= kv:
        group = f"groups of {r} query heads and 1 key/value head" if heads != kv else "heads"
        problems.append(f"head_ratio {head_ratio:g} cannot remove whole key/value groups: the model has {kv} "
                        f"{group}, so the ratio must be k/{kv}; choose one of {choices} (--head_ratio, or "
                        f"--sparsity when head_ratio is unset)")
    elif round(removed) not in usable:
        k = kv - round(removed)
        problems.append(f"head_ratio {head_ratio:g} leaves {k * r} query heads, which transformers refuses "
                        f"({config_refusal(config, k * r, k, ff)}); choose one of {choices}")
    ff_kept = int(ff * (1.0 - mlp_ratio))
    if ff_kept < 1:
        problems.append(f"mlp_ratio {mlp_ratio:g} keeps no MLP channel of {ff}; lower it")
    if problems:
        return None, problems
    kv_kept = kv - round(removed)
    return WidthPlan(heads, kv, head_dim_of(config), ff, kv_kept * r, kv_kept, ff_kept), []


def check_model(cfg: PruneConfig, model: nn.Module) -> list[str]:
    """Every problem pruning ``model`` with ``cfg`` would hit: an unsupported architecture (naming the
    supported ones), a selection that matches nothing, an input width that M does not divide (naming the
    layer), a structured ratio that cannot keep heads whole (naming the ratios that can); asked of the method
    (:attr:`pipeline.prune_methods.PruneMethod.check_model`)."""
    return get(cfg.method).check_model(cfg, model)


def _check_structured(cfg: PruneConfig, model: nn.Module) -> list[str]:
    plan, problems = width_plan(model.config, *cfg.ratios())
    if plan and cfg.structured_backend == "torch_pruning" and plan.num_key_value_heads != plan.num_attention_heads:
        problems.append("--structured_backend torch_pruning handles multi-head attention only (its dependency "
                        "graph never finishes on grouped-query attention); use auto or manual")
    n_layers = int(getattr(model.config, "num_hidden_layers", 0))
    if cfg.drop_layers >= n_layers > 0:
        problems.append(f"--drop_layers {cfg.drop_layers} leaves no decoder block of {n_layers}; use at most "
                        f"{n_layers - 1}")
    return problems


def _check_masked(cfg: PruneConfig, model: nn.Module) -> list[str]:
    """magnitude and nm: the selection, wanda's scoring and (nm) M dividing every input width."""
    try:
        selected = prunable_weights(model, cfg.include, cfg.exclude)
    except ValueError as e:
        return [f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}): {e}"]
    problems = []
    if cfg.importance == "wanda":
        from pipeline.importance import score_module

        for pw in selected.values():
            try:
                score_module(model, pw)
            except ValueError as e:
                problems.append(str(e))
    if cfg.method == "nm":
        for name, pw in selected.items():
            if pw.in_width % cfg.m:
                problems.append(f"{name}: input width {pw.in_width} is not a multiple of M={cfg.m}; choose an M "
                                f"that divides it or --exclude this layer")
    return problems


# ---------------------------------------------------------------------------------------------
# structured (width) pruning of LLaMA


def _sq_norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared L2 norm of every slice of a 2-D weight along ``dim`` (0: per row, 1: per column)."""
    w = weight.detach().float()
    return w.pow(2).sum(dim=1 - dim)


def kv_group_importance(q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear, heads: int,
                        kv: int, head_dim: int) -> torch.Tensor:
    """Magnitude importance of each key/value group of a LLaMA attention block, shape ``(kv,)``; the projections
    are :meth:`pipeline.architectures.Architecture.attention_projections` of the block.

    Group ``g`` is key/value head ``g`` and query heads ``g·r … (g+1)·r - 1`` (``r = heads / kv``, the
    order ``repeat_kv`` uses).  Its score is the mean, over ``q_proj``, ``k_proj``, ``v_proj`` (rows) and
    ``o_proj`` (columns), of the mean squared L2 norm of the group's channels: with multi-head attention
    this equals torch-pruning's head score with ``GroupMagnitudeImportance(p=2, group_reduction="mean")``
    (per-channel squared norms averaged over the group's layers, then over the head's channels).
    """
    r = heads // kv
    q = _sq_norms(q_proj.weight, 0).view(kv, r * head_dim).mean(1)
    o = _sq_norms(o_proj.weight, 1).view(kv, r * head_dim).mean(1)
    k = _sq_norms(k_proj.weight, 0).view(kv, head_dim).mean(1)
    v = _sq_norms(v_proj.weight, 0).view(kv, head_dim).mean(1)
    return (q + k + v + o) / 4


def mlp_channel_importance(mlp_in: list[nn.Linear], mlp_out: nn.Linear) -> torch.Tensor:
    """Magnitude importance of each intermediate channel of an MLP, shape ``(intermediate_size,)``: the mean of
    the squared L2 norms of its rows in ``mlp_in`` (LLaMA: ``gate_proj``, ``up_proj``) and its ``mlp_out`` column
    (``down_proj``; :meth:`pipeline.architectures.Architecture.mlp_projections`), torch-pruning's
    ``GroupMagnitudeImportance(p=2)`` before its normalisation, which keeps the order."""
    total = _sq_norms(mlp_in[0].weight, 0)
    for lin in mlp_in[1:]:
        total = total + _sq_norms(lin.weight, 0)
    return (total + _sq_norms(mlp_out.weight, 1)) / (len(mlp_in) + 1)


def _removed(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the ``len(scores) - n_keep`` lowest scores (``torch.topk`` order for ties), ascending."""
    n_drop = scores.numel() - n_keep
    if n_drop <= 0:
        return []
    return sorted(torch.topk(scores, n_drop, largest=False).indices.tolist())


@torch.no_grad()
def _manual_prune_block(block: nn.Module, plan: WidthPlan, arch: Architecture, kv_scores: torch.Tensor | None = None,
                        mlp_scores: torch.Tensor | None = None) -> None:
    """Slice one block's ranked key/value groups and MLP channels; ``kv_scores``/``mlp_scores`` replace the
    magnitude importances when given (e.g. :func:`pipeline.importance.llama_activation_importance`)."""
    import torch_pruning as tp

    (q_proj, k_proj, v_proj, o_proj), (mlp_in, mlp_out) = arch.attention_projections(block), arch.mlp_projections(block)
    hd = plan.head_dim
    if plan.new_key_value_heads < plan.num_key_value_heads:
        r = plan.num_attention_heads // plan.num_key_value_heads
        if kv_scores is None:
            kv_scores = kv_group_importance(q_proj, k_proj, v_proj, o_proj, plan.num_attention_heads,
                                            plan.num_key_value_heads, hd)
        groups = _removed(kv_scores, plan.new_key_value_heads)
        q_idx = [c for g in groups for c in range(g * r * hd, (g + 1) * r * hd)]
        kv_idx = [c for g in groups for c in range(g * hd, (g + 1) * hd)]
        tp.prune_linear_out_channels(q_proj, q_idx)
        tp.prune_linear_out_channels(k_proj, kv_idx)
        tp.prune_linear_out_channels(v_proj, kv_idx)
        tp.prune_linear_in_channels(o_proj, q_idx)
    if plan.new_intermediate_size < plan.intermediate_size:
        scores = mlp_channel_importance(mlp_in, mlp_out) if mlp_scores is None else mlp_scores
        idx = _removed(scores, plan.new_intermediate_size)
        for lin in mlp_in:
            tp.prune_linear_out_channels(lin, idx)
        tp.prune_linear_in_channels(mlp_out, idx)


@torch.enable_grad()  # torch-pruning traces the block with autograd
def _torch_pruning_block(block: nn.Module, plan: WidthPlan, rotary: nn.Module, arch: Architecture,
                         seq: int = 8) -> None:
    """torch-pruning on one block's attention and MLP, each traced on its own (tracing the whole model, or
    grouped-query attention, does not finish with torch-pruning 1.6.1 and transformers 5; see FACTS.md)."""
    import torch_pruning as tp

    q_proj, k_proj, v_proj, o_proj = arch.attention_projections(block)
    mlp_in, mlp_out = arch.mlp_projections(block)
    p, d = q_proj.weight, q_proj.in_features
    x = torch.randn(1, seq, d, dtype=p.dtype, device=p.device)
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    attn, mlp = block.get_submodule(arch.attention), block.get_submodule(arch.mlp)
    heads_removed = plan.num_attention_heads - plan.new_attention_heads
    if heads_removed:
        if plan.num_key_value_heads != plan.num_attention_heads:
            raise ValueError("the torch_pruning backend handles multi-head attention only (its dependency graph "
                             "never finishes on grouped-query attention); use --structured_backend manual or auto")
        pos = torch.arange(seq, device=p.device)[None]
        # torch-pruning removes ceil(ratio * heads) heads: (k - 0.5) / heads gives exactly k
        ratio = (heads_removed - 0.5) / plan.num_attention_heads
        nh = {q_proj: plan.num_attention_heads, k_proj: plan.num_attention_heads, v_proj: plan.num_attention_heads}
        pruner = tp.pruner.BasePruner(
            attn, example_inputs={"hidden_states": x, "position_embeddings": rotary(x, pos), "attention_mask": None},
            importance=imp, pruning_ratio=ratio, head_pruning_ratio=ratio, num_heads=nh, prune_num_heads=True,
            prune_head_dims=False, ignored_layers=[o_proj], output_transform=lambda out: out[0])
        with torch.no_grad():
            pruner.step()
    if plan.new_intermediate_size < plan.intermediate_size:
        ratio = 1.0 - plan.new_intermediate_size / plan.intermediate_size
        pruner = tp.pruner.BasePruner(mlp, example_inputs=x, importance=imp, pruning_ratio=ratio,
                                      ignored_layers=[mlp_out])
        with torch.no_grad():
            pruner.step()
        if mlp_in[0].out_features != plan.new_intermediate_size:  # floating-point rounding of the ratio
            raise RuntimeError(f"torch-pruning kept {mlp_in[0].out_features} MLP channels, "
                               f"expected {plan.new_intermediate_size}; use --structured_backend manual")


def prune_llama_width(model: nn.Module, head_ratio: float, mlp_ratio: float,
                      backend: Literal["auto", "torch_pruning", "manual"] = "auto",
                      scores: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> WidthPlan:
    """Remove whole key/value groups (with their query heads) and MLP channels from every block, in place.

    Every block loses the same number of groups and channels (each ranked within its block by
    :func:`kv_group_importance` / :func:`mlp_channel_importance`), the hidden size stays, and
    ``model.config`` gets ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and an
    explicit ``head_dim``, so ``save_pretrained`` writes a model ``from_pretrained`` loads as it is.

    Args:
        model: a ``LlamaForCausalLM``.
        head_ratio: fraction of key/value groups removed, ``k / num_key_value_heads``.
        mlp_ratio: fraction of MLP intermediate channels removed.
        backend: ``torch_pruning`` (multi-head attention only), ``manual``, or ``auto`` (torch_pruning for
            multi-head attention, manual for grouped-query attention).
        scores: block index -> (key/value-group importance ``(kv,)``, MLP-channel importance
            ``(intermediate_size,)``) used instead of the magnitude criterion (the manual backend slices them;
            ``torch_pruning`` is refused).

    Returns:
        the :class:`WidthPlan` applied.

    Raises:
        ValueError: an unsupported model or ratio (the message names the valid ratios).
        RuntimeError: when a pruned layer does not have the planned shape.
    """
    plan, problems = width_plan(model.config, head_ratio, mlp_ratio)
    if problems:
        raise ValueError("; ".join(problems))
    mha = plan.num_key_value_heads == plan.num_attention_heads
    if scores is not None and backend == "torch_pruning":
        raise ValueError("given importance scores are sliced by the manual backend; use backend auto or manual")
    use_tp = scores is None and (backend == "torch_pruning" or (backend == "auto" and mha))
    arch = architectures.of(model)
    rotary = arch.rotary_of(model)
    layers = arch.blocks_of(model)[1]
    for i, block in enumerate(layers):
        if use_tp:
            _torch_pruning_block(block, plan, rotary, arch)
        elif scores is not None:
            _manual_prune_block(block, plan, arch, *scores[i])
        else:
            _manual_prune_block(block, plan, arch)
    hd = plan.head_dim
    want = {arch.q: (plan.new_attention_heads * hd, None), arch.k: (plan.new_key_value_heads * hd, None),
            arch.v: (plan.new_key_value_heads * hd, None), arch.o: (None, plan.new_attention_heads * hd),
            **{p: (plan.new_intermediate_size, None) for p in arch.mlp_in},
            arch.mlp_out: (None, plan.new_intermediate_size)}
    for i, block in enumerate(layers):
        for name, (out_f, in_f) in want.items():
            lin = block.get_submodule(name)
            if (out_f is not None and lin.out_features != out_f) or (in_f is not None and lin.in_features != in_f):
                raise RuntimeError(f"layer {i} {name} is {tuple(lin.weight.shape)} after pruning, "
                                   f"expected out={out_f} in={in_f}")
    set_sizes(model.config, plan.new_attention_heads, plan.new_key_value_heads, plan.new_intermediate_size, hd)
    return plan


def llama_param_count(config: Any) -> int:
    """Parameters of a ``LlamaForCausalLM`` with ``config`` (tied embeddings counted once):
    ``V·d·(1 or 2) + d + L·(2d + d·(H+2K)·h + H·h·d + 3·d·F + biases)``, with ``V`` vocabulary, ``d`` hidden,
    ``L`` layers, ``H``/``K`` query/key-value heads, ``h`` head width, ``F`` intermediate size."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H, K, h, F = config.num_attention_heads, config.num_key_value_heads, head_dim_of(config), config.intermediate_size
    attn = d * (H + 2 * K) * h + H * h * d + (((H + 2 * K) * h + d) if config.attention_bias else 0)
    mlp = 3 * d * F + ((2 * F + d) if getattr(config, "mlp_bias", False) else 0)
    emb = V * d * (1 if config.tie_word_embeddings else 2)
    return emb + d + L * (2 * d + attn + mlp)


# ---------------------------------------------------------------------------------------------
# one call for the stage


def _block_linear_shapes(model: nn.Module) -> dict[str, int]:
    """numel of every linear weight in the decoder blocks, by parameter name."""
    return {k: pw.param.numel() for k, pw in prunable_weights(model).items()}


def _original_names(shapes: dict[str, int], kept: list[int], prefix: str) -> dict[str, int]:
    """``shapes`` of a depth-pruned model renamed to the blocks' indices before pruning (``kept[new] = old``)."""
    import re

    out = {}
    for k, v in shapes.items():
        m = re.match(re.escape(prefix) + r"(\d+)\.(.*)", k)
        out[f"{prefix}{kept[int(m.group(1))]}.{m.group(2)}" if m else k] = v
    return out


def prune_model(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None = None) -> dict[str, Any]:
    """Prune ``model`` in place as ``cfg`` says and measure the result.

    Args:
        model: the dense model.
        cfg: the stage's configuration.
        calib: ``(N, seq_len)`` calibration token ids from the training split
            (:func:`pipeline.calibration.calibration_blocks`); needed when ``cfg.needs_calibration()``.

    Returns:
        ``masks`` (name -> bool keep-mask; ``None`` for structured), ``layer_sparsity`` (name -> fraction
        of the weight removed: zeros for magnitude/nm, entries cut away for structured; a removed block's
        weights count 1.0 under their original names), ``sparsity`` (the same over all of them), ``plan``
        (the :class:`WidthPlan` as a dict; structured only) and ``depth`` (structured with ``drop_layers``:
        ``dropped`` and ``kept`` original block indices and every block's ``block_influence``; else ``None``).

    Raises:
        ValueError: what :func:`check_model` reports, or calibration data missing where it is needed.
    """
    problems = check_model(cfg, model)
    if cfg.needs_calibration() and calib is None:
        problems.append(f"--importance {cfg.importance} / --drop_layers {cfg.drop_layers} need calibration blocks "
                        f"of the training split (pipeline.calibration.calibration_blocks)")
    if problems:
        raise ValueError("; ".join(problems))
    return get(cfg.method).prune(model, cfg, calib)


def _prune_structured(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None) -> dict[str, Any]:
    bs = cfg.eval_batch_size
    before = _block_linear_shapes(model)
    depth = None
    blocks_name, layers = architectures.of(model).blocks_of(model)
    kept = list(range(len(layers)))
    if cfg.drop_layers:
        from pipeline.calibration import block_influence
        from pipeline.importance import drop_decoder_blocks, lowest

        bi = block_influence(model, layers, calib, bs)
        dropped = lowest(bi, cfg.drop_layers)
        kept = drop_decoder_blocks(model, dropped)
        depth = {"dropped": dropped, "kept": kept, "block_influence": [float(v) for v in bi]}
    scores = None
    if cfg.importance == "activation":
        from pipeline.importance import llama_activation_importance

        scores = llama_activation_importance(model, calib, bs)  # on the depth-pruned model
    plan = prune_llama_width(model, *cfg.ratios(), backend=cfg.structured_backend, scores=scores)
    after = _original_names(_block_linear_shapes(model), kept, blocks_name + ".")
    layers = {k: 1.0 - after.get(k, 0) / n for k, n in before.items()}
    overall = 1.0 - sum(after.values()) / sum(before.values())
    return {"masks": None, "layer_sparsity": layers, "sparsity": overall, "plan": plan.__dict__, "depth": depth}


def _prune_masked(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None) -> dict[str, Any]:
    """magnitude and nm: keep-masks by |w| or Wanda's score, applied in place."""
    if cfg.importance == "wanda":
        from pipeline.importance import wanda_masks

        selected = prunable_weights(model, cfg.include, cfg.exclude)
        masks = wanda_masks(model, selected, calib, cfg.eval_batch_size, cfg.method, cfg.sparsity, cfg.n, cfg.m,
                            cfg.calib_order)
    else:
        masks = compute_masks(model, cfg.method, cfg.sparsity, cfg.scope, cfg.n, cfg.m, cfg.include, cfg.exclude)
    apply_masks(model, masks)
    rep = sparsity_report(model, masks)
    return {"masks": masks, "layer_sparsity": rep["layers"], "sparsity": rep["overall"], "plan": None, "depth": None}


def target_sparsity(cfg: PruneConfig) -> float:
    """The sparsity the method aims at: ``1 - n/m`` for nm, ``sparsity`` otherwise."""
    return get(cfg.method).target_sparsity(cfg)


def method_manifest_fields(cfg: PruneConfig) -> dict[str, Any]:
    """Stage 03's method-specific manifest outputs: ``scope``, ``n``, ``m`` (``None`` where the method has no such
    setting) and whatever else the method records."""
    return {"scope": None, "n": None, "m": None, **get(cfg.method).manifest_fields(cfg)}


# ---------------------------------------------------------------------------------------------
# the built-in methods (pipeline.prune_methods); which importance fits which method is checked here


def _validate_magnitude(cfg: PruneConfig) -> list[str]:
    problems = []
    if cfg.importance == "wanda" and cfg.scope == "global":
        problems.append("--importance wanda compares weights within each output row; --scope global does not "
                        "apply: use --scope layer")
    return problems + _masked_importance_problems(cfg)


def _validate_nm(cfg: PruneConfig) -> list[str]:
    problems = []
    if cfg.n < 1 or cfg.m < 2:
        problems.append(f"N:M needs N >= 1 and M >= 2, got --n {cfg.n} --m {cfg.m} (2:4 is --n 2 --m 4)")
    elif cfg.n >= cfg.m:
        problems.append(f"N:M needs N < M (N weights kept of every M), got --n {cfg.n} --m {cfg.m}; "
                        f"for 2:4 pass --n 2 --m 4")
    return problems + _masked_importance_problems(cfg)


def _masked_importance_problems(cfg: PruneConfig) -> list[str]:
    problems = []
    if cfg.importance == "activation":
        problems.append(f"--importance activation ranks heads and MLP channels (structured); for --method "
                        f"{cfg.method} use --importance wanda")
    if cfg.drop_layers:
        problems.append("--drop_layers removes whole decoder blocks: it needs --method structured (with "
                        "--sparsity 0 for depth alone)")
    return problems


def _validate_structured(cfg: PruneConfig) -> list[str]:
    problems = []
    if cfg.include or cfg.exclude:
        problems.append("--include/--exclude select weights for magnitude and nm; structured pruning acts on "
                        "every block's heads and MLP channels: drop them")
    if cfg.importance == "wanda":
        problems.append("--importance wanda ranks single weights (magnitude, nm); for structured pruning use "
                        "--importance activation")
    return problems


register(PruneMethod(
    "magnitude", _prune_masked, validate=_validate_magnitude, check_model=_check_masked,
    needs_calibration=lambda cfg: cfg.importance != "magnitude",
    manifest_fields=lambda cfg: {"scope": cfg.scope}))
register(PruneMethod(
    "nm", _prune_masked, validate=_validate_nm, check_model=_check_masked,
    needs_calibration=lambda cfg: cfg.importance != "magnitude",
    target_sparsity=lambda cfg: 1.0 - cfg.n / cfg.m,
    manifest_fields=lambda cfg: {"n": cfg.n, "m": cfg.m}))
register(PruneMethod(
    "structured", _prune_structured, validate=_validate_structured, check_model=_check_structured,
    needs_calibration=lambda cfg: cfg.importance != "magnitude" or cfg.drop_layers > 0,
    writes_masks=False))

