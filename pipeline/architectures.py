"""Where each supported architecture keeps its blocks, attention and MLP projections, norms and head counts.

Everything that acts on a model's layout by module name reads it from here: the prunable set and the masks
(:func:`pipeline.sparsity.decoder_blocks`), structured width and depth pruning (:mod:`pipeline.prune`,
:mod:`pipeline.importance`), the encoder's MLP-channel pruning (:mod:`pipeline.classify_compress`) and the fused
q/k/v and gate/up matmuls of stage 05 (:func:`pipeline.evaluate.fuse_sibling_projections`).  An entry is keyed by
the ``transformers`` config's ``model_type``; paths are dotted ``get_submodule`` names, block paths relative to
one block, model paths relative to the base model (``model.base_model``: ``LlamaModel``, ``GPT2Model``,
``BertModel``), so one entry serves every head (causal LM, masked LM, sequence classification).

A new architecture is one :func:`register` call with its :class:`Architecture`; ``tests/test_architectures.py``
resolves every registered entry on a real tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """One model layout.

    Attributes:
        name: the config's ``model_type`` (``llama``, ``gpt2``, ``bert``).
        blocks: the ``nn.ModuleList`` of transformer blocks, from the base model (``layers``, ``h``,
            ``encoder.layer``).
        attention: the attention module, in a block (its ``layer_idx`` is renumbered when blocks are removed).
        q, k, v: the query, key and value projections, in a block; the same path for all three when one fused
            matrix computes them (GPT-2's ``attn.c_attn``: see :attr:`qkv_fused`).
        o: the attention output projection, in a block (its input is the heads' outputs, laid out head by head).
        mlp: the MLP module, in a block (``None`` when the MLP is not one module, as BERT's
            ``intermediate`` / ``output`` pair).
        mlp_in: the projections whose outputs are the MLP's intermediate channels (``gate_proj``, ``up_proj``
            for SwiGLU; one for a GELU MLP).
        mlp_out: the projection reading the intermediate channels (``down_proj``, ``c_proj``, ``output.dense``).
        norms: the block's normalisation layers, in forward order.
        final_norm: the norm after the last block, from the base model (``None``: none).
        rotary: the rotary position embedding module, from the base model (``None``: none).
        kv_heads_attr: the config attribute counting key/value heads (``None``: as many as query heads).
        fusable: groups of projections (block paths) that read the same input and that stage 05 may fuse into
            one matmul, each ``(name of the fused module, (paths in forward order))``; the parts of a group share
            one parent module.
        width_prunable: stage 03's ``structured`` method can remove this layout's key/value groups and MLP
            channels (separate ``nn.Linear`` q/k/v/o and MLP projections, head counts in the config).
    """

    name: str
    blocks: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp: str | None
    mlp_in: tuple[str, ...]
    mlp_out: str
    norms: tuple[str, ...]
    final_norm: str | None = None
    rotary: str | None = None
    kv_heads_attr: str | None = None
    fusable: tuple[tuple[str, tuple[str, ...]], ...] = ()
    width_prunable: bool = False

    @property
    def qkv_fused(self) -> bool:
        """True when one matrix computes queries, keys and values (``q``, ``k`` and ``v`` name the same module)."""
        return self.q == self.k == self.v

    # --- the model ------------------------------------------------------------------------------

    def blocks_of(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """``(qualified name in model, module list)`` of the transformer blocks (``model.layers``,
        ``transformer.h``, ``bert.encoder.layer`` for the task-head models)."""
        base = _base(model)
        blocks = base.get_submodule(self.blocks)
        prefix = next(n for n, m in model.named_modules() if m is base)
        return (f"{prefix}.{self.blocks}" if prefix else self.blocks), blocks

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Put ``blocks`` in place of the model's block list."""
        parent, _, leaf = self.blocks.rpartition(".")
        setattr(_base(model).get_submodule(parent), leaf, blocks)

    def rotary_of(self, model: nn.Module) -> nn.Module | None:
        return _base(model).get_submodule(self.rotary) if self.rotary else None

    # --- one block ------------------------------------------------------------------------------

    def attention_projections(self, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """``(q, k, v, o)`` of ``block`` (the first three the same module when :attr:`qkv_fused`)."""
        return tuple(block.get_submodule(p) for p in (self.q, self.k, self.v, self.o))  # type: ignore[return-value]

    def mlp_projections(self, block: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        """``([the projections into the intermediate channels], the projection out of them)`` of ``block``."""
        return [block.get_submodule(p) for p in self.mlp_in], block.get_submodule(self.mlp_out)

    def replace(self, block: nn.Module, path: str, module: nn.Module) -> None:
        """Put ``module`` at ``path`` (a block path) of ``block``."""
        parent, _, leaf = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, leaf, module)

    # --- the config -----------------------------------------------------------------------------

    def heads(self, config: Any) -> int:
        """Query heads."""
        return int(config.num_attention_heads)

    def kv_heads(self, config: Any) -> int:
        """Key/value heads (grouped-query attention), the query heads' count where the layout has no such field."""
        v = getattr(config, self.kv_heads_attr, None) if self.kv_heads_attr else None
        return int(v) if v is not None else self.heads(config)

    def head_dim(self, config: Any) -> int:
        """Width of one head: the config's ``head_dim`` when set, else ``hidden_size / num_attention_heads``."""
        return int(getattr(config, "head_dim", None) or config.hidden_size // self.heads(config))


def _base(model: nn.Module) -> nn.Module:
    """The base model of a ``transformers`` model with a task head (itself when it is the base model)."""
    return getattr(model, "base_model", model)


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` under its ``model_type`` (a name registered twice is an error)."""
    if arch.name in ARCHITECTURES and ARCHITECTURES[arch.name] != arch:
        raise ValueError(f"architecture '{arch.name}' is registered twice")
    ARCHITECTURES[arch.name] = arch
    return arch


def names() -> tuple[str, ...]:
    """The registered ``model_type`` values, in registration order."""
    return tuple(ARCHITECTURES)


def get(model_type: str | None) -> Architecture:
    """The entry of ``model_type``.

    Raises:
        KeyError: naming ``model_type`` and the registered architectures (the fix: an entry in this module).
    """
    if model_type not in ARCHITECTURES:
        raise KeyError(f"architecture '{model_type}' is not registered in pipeline/architectures.py (registered: "
                       f"{', '.join(ARCHITECTURES)}); add an Architecture entry for it")
    return ARCHITECTURES[model_type]


def of(model: nn.Module) -> Architecture:
    """The entry of ``model`` (by ``model.config.model_type``); raises ``KeyError`` as :func:`get`."""
    return get(getattr(getattr(model, "config", None), "model_type", None))


def find(model: nn.Module) -> Architecture | None:
    """The entry of ``model``, or ``None`` when its ``model_type`` is not registered."""
    return ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))


# LLaMA (transformers' LlamaForCausalLM): pre-norm RMSNorm blocks, separate q/k/v/o, SwiGLU MLP, RoPE, GQA
register(Architecture(
    "llama", blocks="layers", attention="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"), final_norm="norm", rotary="rotary_emb",
    kv_heads_attr="num_key_value_heads",
    fusable=(("qkv_fused", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("gate_up_fused", ("mlp.gate_proj", "mlp.up_proj"))),
    width_prunable=True))

# GPT-2 (GPT2LMHeadModel): Conv1D layers ((in, out) weights), one fused q/k/v matrix, GELU MLP, learned positions
register(Architecture(
    "gpt2", blocks="h", attention="attn", q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj",
    mlp="mlp", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", norms=("ln_1", "ln_2"), final_norm="ln_f"))

# BERT (BertForMaskedLM / BertForSequenceClassification): post-norm encoder blocks, GELU MLP split over two modules
register(Architecture(
    "bert", blocks="encoder.layer", attention="attention.self", q="attention.self.query",
    k="attention.self.key", v="attention.self.value", o="attention.output.dense", mlp=None,
    mlp_in=("intermediate.dense",), mlp_out="output.dense", norms=("attention.output.LayerNorm", "output.LayerNorm")))
