"""Activation-aware pruning importance (pipeline.calibration, pipeline.importance) on tiny real models and data.

Wanda scores against a hand computation, N:M masks from activation scores, calibration that reads the training
split only, Minitron head / MLP-channel importance that keeps key/value groups whole, Block Influence depth
pruning, and every new option through the stage script and on into distillation with sparsity kept.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.calibration import block_influence, calibration_blocks, channel_activations, input_sq_norms
from pipeline.importance import (
    drop_decoder_blocks,
    kv_group_activation_importance,
    llama_activation_importance,
    row_mask,
    wanda_masks,
    wanda_scores,
)
from pipeline.manifest import read_manifest, write_manifest
from pipeline.prune import PruneConfig, check_model, prune_model
from pipeline.sparsity import (
    check_nm,
    compute_masks,
    count_mask_violations,
    load_masks,
    nm_mask,
    prunable_weights,
)
from pipeline.tokens import load_tokens

ROOT = Path(__file__).resolve().parent.parent


def random_blocks(n: int = 8, seq: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Wanda


def test_wanda_scores_and_row_masks_equal_a_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [0.5, 0.5, -0.5, 0.5],
                      [4.0, 3.0, 2.0, 1.5]])
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0],   # two calibration tokens, 4 input features
                      [1.0, 1.0, 0.0, 3.0]])
    sq = (x ** 2).sum(0)  # [2, 1, 4, 9]
    s = wanda_scores(w, sq)
    r2 = math.sqrt(2)
    hand = torch.tensor([[1 * r2, 2 * 1, 3 * 2, 4 * 3],
                         [0.5 * r2, 0.5 * 1, 0.5 * 2, 0.5 * 3],
                         [4 * r2, 3 * 1, 2 * 2, 1.5 * 3]])
    torch.testing.assert_close(s, hand)
    # 50% per output row: each row drops its two lowest scores
    keep = row_mask(s, 0.5)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True], [True, False, False, True]]
    # plain magnitude (one threshold per matrix) drops a whole row instead: the comparison group matters
    assert compute_masks_from(w, 0.5)[1].sum() == 0
    # 2:4 from the scores is the same here (one group of four per row); a Conv1D layout (in, out) gives the transpose
    assert torch.equal(nm_mask(s, 2, 4), keep)
    assert torch.equal(row_mask(wanda_scores(w.t(), sq, in_dim=0), 0.5, in_dim=0), keep.t())


def compute_masks_from(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    from pipeline.sparsity import magnitude_mask

    return magnitude_mask(w, sparsity)


def test_input_norms_from_hooks_equal_the_inputs_recomputed_by_hand():
    model = tiny_llama()
    blocks = random_blocks()
    blk = model.model.layers[0]
    got = input_sq_norms(model, {"q": blk.self_attn.q_proj, "down": blk.mlp.down_proj}, blocks, batch_size=3)
    with torch.no_grad():
        h = blk.input_layernorm(model.model.embed_tokens(blocks))  # q_proj's input in block 0
    torch.testing.assert_close(got["q"], h.pow(2).sum((0, 1)))
    with torch.no_grad():  # down_proj's input: act(gate) * up of the MLP's (normed) input
        mid = {}
        hook = blk.mlp.register_forward_hook(lambda m, a, o: mid.setdefault("x", a[0]))
        model(input_ids=blocks)
        hook.remove()
        inter = blk.mlp.act_fn(blk.mlp.gate_proj(mid["x"])) * blk.mlp.up_proj(mid["x"])
    torch.testing.assert_close(got["down"], inter.pow(2).sum((0, 1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", ["sequential", "one_pass"])
def test_nm_masks_from_activation_scores_keep_the_pattern_and_follow_the_scores(order):
    model = tiny_llama(kv_heads=2)
    dense = copy.deepcopy(model)
    blocks = random_blocks()
    selected = prunable_weights(model)
    masks = wanda_masks(model, selected, blocks, 4, method="nm", n=2, m=4, order=order)
    assert set(masks) == set(selected)
    for k, keep in masks.items():
        assert keep.shape == selected[k].param.shape
        assert check_nm(keep.float(), 2, 4) and keep.float().mean().item() == 0.5  # exactly 2 of every 4
    # block 0 sees the dense model's inputs in either order: its masks are the top-2 scores of every group
    q = "model.layers.0.self_attn.q_proj.weight"
    norms = input_sq_norms(dense, {q: dense.model.layers[0].self_attn.q_proj}, blocks, 4)[q]
    assert torch.equal(masks[q], nm_mask(wanda_scores(dense.get_parameter(q), norms), 2, 4))
    # activation scores choose other weights than |w| alone somewhere
    mag = compute_masks(dense, "nm")
    assert any(not torch.equal(masks[k], mag[k]) for k in masks)
    # sequential leaves the model pruned by the masks; one_pass leaves it dense
    params = dict(model.named_parameters())
    pruned = all(bool((params[k][~v] == 0).all()) for k, v in masks.items())
    assert pruned == (order == "sequential")


def test_wanda_unstructured_prunes_each_output_row_to_the_target():
    model = tiny_llama()
    cfg = PruneConfig(method="magnitude", importance="wanda", sparsity=0.5)
    res = prune_model(model, cfg, random_blocks())
    for k, keep in res["masks"].items():
        assert torch.all((~keep).sum(1) == keep.shape[1] // 2), k  # every output row loses exactly half
    assert res["sparsity"] == 0.5


def test_wanda_refuses_embeddings_global_scope_and_missing_calibration():
    model = tiny_llama()
    # tied embeddings: the weight is also lm_head's, whose inputs are activations
    assert check_model(PruneConfig(importance="wanda", include=["embed_tokens"]), model) == []
    untied = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": False})).eval()
    p = check_model(PruneConfig(importance="wanda", include=["embed_tokens"]), untied)
    assert p and "embedding" in p[0] and "--exclude" in p[0]
    assert any("--scope layer" in x for x in PruneConfig(importance="wanda", scope="global").validate())
    with pytest.raises(ValueError, match="calibration blocks of the training split"):
        prune_model(model, PruneConfig(importance="wanda"))


# ---------------------------------------------------------------------------------------------
# calibration reads the training split only


def _poison_val(data_dir: Path) -> None:
    """Overwrite the validation shard(s) in place with another token stream of the same length."""
    m = read_manifest(data_dir)
    for s in m["outputs"]["val_shards"]:
        arr = np.memmap(data_dir / s, dtype=np.dtype(m["outputs"]["dtype"]), mode="r+")
        arr[:] = (np.arange(len(arr)) * 7 + 3) % int(m["outputs"]["vocab_size"])
        arr.flush()


def test_calibration_blocks_come_from_the_training_split_and_never_open_validation(tiny_data_template, tmp_path,
                                                                                     monkeypatch):
    data_dir = tmp_path / "01_data"
    shutil.copytree(tiny_data_template, data_dir)
    m = read_manifest(data_dir)
    val_paths = {str(data_dir / s) for s in m["outputs"]["val_shards"]}
    opened = []
    real_memmap = np.memmap

    def spy(path, *a, **k):
        opened.append(str(path))
        if str(path) in val_paths:
            raise AssertionError(f"calibration opened the validation shard {path}")
        return real_memmap(path, *a, **k)

    monkeypatch.setattr(np, "memmap", spy)
    blocks = calibration_blocks(data_dir, m, 12, 16, seed=3)
    monkeypatch.setattr(np, "memmap", real_memmap)
    assert opened and not set(opened) & val_paths
    assert blocks.shape == (12, 16) and blocks.dtype == torch.int64
    train = torch.from_numpy(load_tokens(data_dir, "train", m).astype(np.int64))
    for b in blocks:  # every block is an aligned block of the training tokens
        starts = [i for i in range(0, len(train) - 15, 16) if torch.equal(train[i:i + 16], b)]
        assert starts, "a calibration block is not a block of the training split"
    assert len({tuple(b.tolist()) for b in blocks}) == 12  # drawn without replacement
    assert torch.equal(blocks, calibration_blocks(data_dir, m, 12, 16, seed=3))  # seeded
    assert not torch.equal(blocks, calibration_blocks(data_dir, m, 12, 16, seed=4))
    _poison_val(data_dir)
    assert torch.equal(blocks, calibration_blocks(data_dir, m, 12, 16, seed=3))
    with pytest.raises(ValueError, match="lower --calib_blocks"):
        calibration_blocks(data_dir, m, len(train) // 16 + 1, 16)


# ---------------------------------------------------------------------------------------------
# structured: Minitron activation importance


def _o_proj_inputs(model, blocks, layer: int = 0) -> torch.Tensor:
    got = {}
    h = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: got.setdefault("x", []).append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=blocks)
    h.remove()
    return torch.cat(got["x"])


def test_activation_importance_is_minitrons_aggregation_over_whole_kv_groups():
    model = tiny_llama(kv_heads=2)
    blocks = random_blocks()
    x = _o_proj_inputs(model, blocks)  # (B, S, heads·head_dim)
    channel = x.abs().mean(1).pow(2).sum(0).sqrt()  # batch = L2, sequence = mean
    hand = torch.stack([channel[g * 32:(g + 1) * 32].norm() for g in range(2)])  # 2 query heads of 16 per group
    scores = llama_activation_importance(model, blocks, batch_size=3)
    torch.testing.assert_close(scores[0][0], hand, rtol=1e-5, atol=1e-6)
    stats = channel_activations(model, {"o": model.model.layers[0].self_attn.o_proj}, blocks, 8)["o"]
    torch.testing.assert_close(kv_group_activation_importance(stats, 4, 2, 16), hand, rtol=1e-5, atol=1e-6)
    assert scores[1][1].shape == (192,) and bool((scores[1][1] >= 0).all())


def test_structured_activation_keeps_heads_whole_and_is_gqa_aware():
    dense = tiny_llama(kv_heads=2)
    hd = 16
    with torch.no_grad():  # group 1 of block 0: tiny outputs (v rows x0.01) but large weights (o columns x50)
        attn = dense.model.layers[0].self_attn
        attn.v_proj.weight[hd:] *= 0.01
        attn.o_proj.weight[:, 2 * hd:] *= 50
        mlp = dense.model.layers[0].mlp
        mlp.up_proj.weight[:96] *= 0.01  # channels 0..95: tiny activations, large down_proj columns
        mlp.down_proj.weight[:, :96] *= 50
    blocks = random_blocks()
    act = copy.deepcopy(dense)
    res = prune_model(act, PruneConfig(method="structured", importance="activation", sparsity=0.5), blocks)
    mag = copy.deepcopy(dense)
    prune_model(mag, PruneConfig(method="structured", structured_backend="manual", sparsity=0.5))
    a0, a1, m1 = dense.model.layers[0].self_attn, act.model.layers[0].self_attn, mag.model.layers[0].self_attn
    assert res["plan"]["new_key_value_heads"] == 1 and res["plan"]["new_attention_heads"] == 2
    # activation removes group 1 whole: key/value head 1 and its query heads 2, 3 (rows 32..63 of q_proj)
    assert torch.equal(a1.k_proj.weight, a0.k_proj.weight[:hd]) and torch.equal(a1.v_proj.weight, a0.v_proj.weight[:hd])
    assert torch.equal(a1.q_proj.weight, a0.q_proj.weight[:2 * hd])
    assert torch.equal(a1.o_proj.weight, a0.o_proj.weight[:, :2 * hd])
    # group magnitude is fooled by the large o_proj columns and keeps group 1
    assert torch.equal(m1.k_proj.weight, a0.k_proj.weight[hd:])
    # MLP: activation removes the low-activation channels 0..95, magnitude keeps them
    d0 = dense.model.layers[0].mlp
    assert torch.equal(act.model.layers[0].mlp.up_proj.weight, d0.up_proj.weight[96:])
    assert torch.equal(mag.model.layers[0].mlp.up_proj.weight, d0.up_proj.weight[:96])
    out = act(input_ids=blocks[:2])
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------------
# depth


def test_block_influence_drops_the_block_that_changes_nothing(tmp_path):
    dense = tiny_llama(layers=3)
    with torch.no_grad():  # block 1 becomes the identity: its attention and MLP write nothing to the stream
        dense.model.layers[1].self_attn.o_proj.weight.zero_()
        dense.model.layers[1].mlp.down_proj.weight.zero_()
    blocks = random_blocks()
    bi = block_influence(dense, dense.model.layers, blocks, 4)
    assert bi.shape == (3,) and abs(float(bi[1])) < 1e-6 and bool((bi[[0, 2]] > 1e-3).all())
    model = copy.deepcopy(dense)
    res = prune_model(model, PruneConfig(method="structured", sparsity=0.0, drop_layers=1), blocks)
    assert res["depth"]["dropped"] == [1] and res["depth"]["kept"] == [0, 2]
    assert model.config.num_hidden_layers == 2 and [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert res["layer_sparsity"]["model.layers.1.mlp.down_proj.weight"] == 1.0
    assert res["layer_sparsity"]["model.layers.2.mlp.down_proj.weight"] == 0.0
    with torch.no_grad():  # removing an identity block changes no output, with or without the cache
        torch.testing.assert_close(model(input_ids=blocks).logits, dense(input_ids=blocks).logits)
        g = model.generate(blocks[:1, :4], max_new_tokens=4, do_sample=False)
        assert torch.equal(g, dense.generate(blocks[:1, :4], max_new_tokens=4, do_sample=False))
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=blocks).logits, dense(input_ids=blocks).logits)
    with pytest.raises(ValueError, match="lower --drop_layers"):
        drop_decoder_blocks(copy.deepcopy(dense), [0, 1, 2])


# ---------------------------------------------------------------------------------------------
# the stage script, then distillation (real stage 01 and 02 from tests/test_distill.py's template)


def load_script():
    spec = importlib.util.spec_from_file_location("script_prune_importance", ROOT / "scripts" / "prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained_run(tiny_data_template, tmp_path_factory) -> Path:
    """results/ with run ``r``: the tiny stage 01 and a stage-02 tiny LLaMA (GQA, 3 blocks) trained 40 steps."""
    from transformers import AutoTokenizer

    results = tmp_path_factory.mktemp("importance_run") / "results"
    data_dir = results / "r" / "01_data"
    shutil.copytree(tiny_data_template, data_dir)
    dm = read_manifest(data_dir)
    seq = int(dm["outputs"]["seq_len"])
    model = tiny_llama(kv_heads=2, layers=3, vocab=int(dm["outputs"]["vocab_size"]))
    train = torch.from_numpy(load_tokens(data_dir, "train", dm).astype("int64"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        starts = torch.randint(0, len(train) - seq - 1, (8,), generator=gen)
        batch = torch.stack([train[s:s + seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1),
                                                 batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    pdir = results / "r" / "02_pretrain"
    model.save_pretrained(pdir / "model")
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(pdir / "model")
    write_manifest(pdir, "pretrain", {"note": "made by tests/test_importance.py"}, {"model_dir": "model",
                   "config_hash": "p0"}, {"val_loss": loss.item(), "val_ppl": math.exp(loss.item())},
                   inputs={"data": data_dir})
    return results


def test_stage_records_importance_and_calibration_and_ignores_the_validation_tokens(trained_run, tmp_path):
    script = load_script()
    results = tmp_path / "results"
    shutil.copytree(trained_run, results)
    base = dict(run="r", results_dir=str(results), preset="tiny", eval_batch_size=16, calib_blocks=16)
    m = script.main(PruneConfig(method="nm", importance="wanda", **base))
    o = m["outputs"]
    assert o["importance"] == "wanda" and o["calibration"]["split"] == "train"
    assert o["calibration"]["blocks"] == 16 and o["calibration"]["tokens"] == 16 * 64
    assert o["calibration"]["order"] == "sequential" and o["calibration"]["shards"] == ["train-00000.bin"]
    masks = load_masks(results / "r" / "03_prune" / "masks.safetensors")
    model = AutoModelForCausalLM.from_pretrained(results / "r" / "03_prune" / "model")
    params = dict(model.named_parameters())
    assert all(check_nm(params[k], 2, 4) for k in masks)
    # the same run with other validation tokens: the same masks, another validation loss
    _poison_val(results / "r" / "01_data")
    m2 = script.main(PruneConfig(method="nm", importance="wanda", overwrite=True, **base))
    masks2 = load_masks(results / "r" / "03_prune" / "masks.safetensors")
    assert all(torch.equal(masks[k], masks2[k]) for k in masks)
    assert m2["metrics"]["dense_val_loss"] != m["metrics"]["dense_val_loss"]
    # the default stays magnitude and reads no calibration
    m3 = script.main(PruneConfig(method="nm", overwrite=True, **base))
    assert m3["outputs"]["importance"] == "magnitude" and m3["outputs"]["calibration"] is None
    # too many calibration blocks is refused before anything is written
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="lower --calib_blocks"):
        script.main(PruneConfig(method="nm", importance="wanda", overwrite=True, **{**base, "calib_blocks": 10**6}))
    assert read_manifest(results / "r" / "03_prune") == m3


from test_distill import TINY, _run_stage, pretrained_template  # noqa: E402, F401 - the distill tests' helpers


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("magnitude", ["--importance", "wanda", "--calib_order", "one_pass"]),
    ("nm", ["--importance", "wanda"]),
    ("structured", ["--importance", "activation", "--drop_layers", "1"]),
])
def test_each_option_round_trips_through_distill_with_sparsity_kept(pretrained_template, tmp_path, method, extra):  # noqa: F811
    results = tmp_path / "results"
    for st in ("01_data", "02_pretrain"):
        shutil.copytree(pretrained_template / st, results / "r" / st, ignore=shutil.ignore_patterns("checkpoints"))
    common = ["--run", "r", "--results_dir", str(results), "--preset", "tiny"]
    _run_stage("prune.py", 1, *common, "--method", method, "--calib_blocks", "16", *extra)
    pm = read_manifest(results / "r" / "03_prune")
    assert pm["outputs"]["importance"] == extra[1] and pm["outputs"]["calibration"]["split"] == "train"
    _run_stage("distill.py", 1, *common, *TINY[2:], "--ds_config", "ds_configs/zero2_fp16.json", "--precision", "fp32")
    dm = read_manifest(results / "r" / "04_distill")
    assert dm["metrics"]["val_loss"] < dm["metrics"]["student_val_loss_before"]
    from pipeline.sparsity import load_export_state_dict

    export = load_export_state_dict(results / "r" / "04_distill" / "model")
    if method == "structured":
        assert pm["outputs"]["depth"]["dropped"] and len(pm["outputs"]["depth"]["kept"]) == 1
        student = AutoModelForCausalLM.from_pretrained(results / "r" / "04_distill" / "model")
        assert student.config.num_hidden_layers == 1 and dm["outputs"]["masks"] is None
        return
    masks = load_masks(results / "r" / "03_prune" / "masks.safetensors")
    assert sum(count_mask_violations(export, masks).values()) == 0
    assert dm["outputs"]["sparsity_checked"] and dm["outputs"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    if method == "nm":
        assert all(check_nm(export[k], 2, 4) for k in masks)
