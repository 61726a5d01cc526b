"""pipeline.architectures: every registered entry resolves on a real tiny model of its kind; an unknown one fails
naming the registered ones."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from pipeline import architectures

pytestmark = pytest.mark.unit

#: a tiny real model of every registered architecture (a new entry needs a builder here, which the first test asks)
BUILDERS = {"llama": lambda: tiny_llama(kv_heads=2), "gpt2": tiny_gpt2, "bert": tiny_bert}


def test_every_registered_architecture_has_a_tiny_model_here():
    assert set(architectures.names()) == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_entry_resolves_on_a_real_model(name):
    model = BUILDERS[name]()
    arch = architectures.of(model)
    assert arch.name == name == model.config.model_type
    blocks_name, blocks = arch.blocks_of(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == model.config.num_hidden_layers
    assert model.get_submodule(blocks_name) is blocks
    cfg = model.config
    d = cfg.hidden_size
    for block in blocks:
        q, k, v, o = arch.attention_projections(block)
        assert block.get_submodule(arch.attention) is not None
        ins, out = arch.mlp_projections(block)
        if arch.qkv_fused:  # GPT-2's Conv1D c_attn: (in, out) = (d, 3d)
            assert q is k is v and tuple(q.weight.shape) == (d, 3 * d)
        else:
            assert tuple(q.weight.shape) == (arch.heads(cfg) * arch.head_dim(cfg), d)
            assert tuple(k.weight.shape) == (arch.kv_heads(cfg) * arch.head_dim(cfg), d) == tuple(v.weight.shape)
        # the MLP's intermediate width is the out side of every mlp_in and the in side of mlp_out
        widths = {int(m.nf) if hasattr(m, "nf") else m.out_features for m in ins}
        out_in = out.weight.shape[0] if hasattr(out, "nf") else out.in_features
        assert len(widths) == 1 and widths == {out_in}
        assert o is not q
        for n in arch.norms:
            assert isinstance(block.get_submodule(n), nn.Module) and hasattr(block.get_submodule(n), "weight")
        if arch.mlp is not None:
            assert all(m in list(block.get_submodule(arch.mlp).modules()) for m in [*ins, out])
        for _, group in arch.fusable:
            parents = {p.rpartition(".")[0] for p in group}
            assert len(parents) == 1 and all(isinstance(block.get_submodule(p), nn.Linear) for p in group)
    if arch.final_norm:
        assert hasattr(model.base_model.get_submodule(arch.final_norm), "weight")
    if arch.rotary:
        assert arch.rotary_of(model) is not None
    assert arch.kv_heads(cfg) == (2 if name == "llama" else cfg.num_attention_heads)


def test_set_blocks_replaces_the_block_list():
    model = tiny_llama()
    arch = architectures.of(model)
    first = arch.blocks_of(model)[1][0]
    arch.set_blocks(model, nn.ModuleList([first]))
    assert list(model.model.layers) == [first]
    out = model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert out.logits.shape == (1, 4, model.config.vocab_size)


def test_unknown_architecture_names_the_registered_ones():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(KeyError) as e:
        architectures.of(model)
    msg = str(e.value)
    assert "'mistral' is not registered" in msg and all(n in msg for n in architectures.names())
    assert architectures.find(model) is None
    # the default prunable set needs the blocks, so magnitude pruning says the same, and how to go on
    from pipeline.sparsity import prunable_weights

    with pytest.raises(ValueError, match="'mistral' is not in pipeline/architectures.py.*--include"):
        prunable_weights(model)
    assert prunable_weights(model, include=[r"layers\.0\.mlp\.down_proj"])  # explicit patterns still work


def test_registering_a_name_twice_with_another_layout_is_refused():
    llama = architectures.get("llama")
    with pytest.raises(ValueError, match="registered twice"):
        architectures.register(architectures.Architecture(**{**llama.__dict__, "blocks": "other"}))
    assert architectures.register(llama) is llama  # the same entry again is harmless
