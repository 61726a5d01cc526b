"""pipeline.compat: each workaround runs on the library versions it was verified on, and outside them the library's
own path runs with one line saying so (the gates of the ZeRO step, checks and masks are tested beside their
differential tests: tests/test_fp16_step.py, tests/test_engine_speed.py, tests/test_distill.py)."""

from __future__ import annotations

import types

import pytest
import torch

import pipeline.compat as compat

pytestmark = pytest.mark.compat


def test_installed_versions_are_the_verified_ones():
    # the environments this was verified on (CPU: torch 2.13 / transformers 5.24; GPU image: 2.11 / 5.17)
    for lib in ("deepspeed", "torch", "transformers"):
        assert compat.is_verified(lib), (lib, compat.version_of(lib))
    assert compat.is_verified("torch", "2.11.0a0+git1234") and compat.is_verified("torch", "2.13.0+cpu")
    assert not compat.is_verified("deepspeed", "0.20.0") and not compat.is_verified("deepspeed", "0.18.9")
    assert compat.is_verified("deepspeed", "0.19.0") and not compat.is_verified("transformers", "5.25.0")


def test_gate_logs_one_line_per_workaround(capsys, unverified):
    assert compat.gate("w", "deepspeed", "its own path")
    assert capsys.readouterr().out == ""
    unverified("deepspeed", "0.21.1")
    assert not compat.gate("w", "deepspeed", "its own path")
    assert not compat.gate("w", "deepspeed", "its own path")
    assert capsys.readouterr().out.splitlines() == [
        "[compat] w: deepspeed 0.21.1 is outside the verified range >=0.19,<0.20; its own path"]


def _zero3_registration():
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})


def test_hf_zero3_registration_lifted_and_restored(capsys, unverified):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from pipeline.compat.hf import without_hf_zero3

    keep = _zero3_registration()  # transformers holds it by a weak reference
    try:
        assert is_deepspeed_zero3_enabled()
        with without_hf_zero3():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        unverified("transformers", "5.30.0")
        with without_hf_zero3():  # transformers' own behaviour: the registration stays
            assert is_deepspeed_zero3_enabled()
        assert "[compat] lifting transformers' ZeRO-3 registration: transformers 5.30.0 is outside the verified " \
               "range >=5.17,<5.25; transformers' registered DeepSpeed config stays in force" in capsys.readouterr().out
    finally:
        unset_hf_deepspeed_config()
        del keep


class _Planted:
    """A class a weights_only load refuses (a pickle of it would build an arbitrary object)."""


def _checkpoint_engine_and_planted_file(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    path = tmp_path / "planted.pt"
    torch.save({"w": torch.ones(2), "x": _Planted()}, path)
    return types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine()), path


def test_deepspeed_checkpoint_loads_weights_only_where_verified(tmp_path, capsys, unverified):
    from pipeline.compat.checkpoint import deepspeed_safe_loading
    from pipeline.integrity import UnsafeFileError, safe_torch_load

    ds, path = _checkpoint_engine_and_planted_file(tmp_path)
    with deepspeed_safe_loading(ds, safe_torch_load) as replaced:
        assert replaced
        with pytest.raises(UnsafeFileError, match="planted.pt"):
            ds.checkpoint_engine.load(str(path), map_location="cpu")
    assert "load" not in vars(ds.checkpoint_engine)  # DeepSpeed's method again after the block
    unverified("deepspeed", "0.20.1")
    with deepspeed_safe_loading(ds, safe_torch_load) as replaced:  # DeepSpeed's own loader (weights_only=False)
        assert not replaced
        assert isinstance(ds.checkpoint_engine.load(str(path), map_location="cpu")["x"], _Planted)
    assert "[compat] weights_only loads of DeepSpeed checkpoints: deepspeed 0.20.1 is outside the verified range " \
           ">=0.19,<0.20; DeepSpeed loads its files itself" in capsys.readouterr().out


def _universal_zero3_fault():
    """A torch AdamW as DeepSpeed 0.19.8's ZeRO-3 universal load leaves it: group 0's weight decay copied into
    group 1, and one ``step`` tensor shared by both parameters' states."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    (a.sum() + b.sum()).backward()
    opt.step()
    from pipeline.compat.checkpoint import group_hyperparameters

    engine = types.SimpleNamespace(ds=types.SimpleNamespace(optimizer=opt))
    before = group_hyperparameters(engine)
    opt.param_groups[1]["weight_decay"] = 0.1
    shared = opt.state[a]["step"]
    opt.state[b]["step"] = shared
    return engine, before, opt, a, b


def test_zero3_universal_load_repaired_only_where_verified(capsys, unverified):
    from pipeline.compat.checkpoint import repair_zero3_universal_load

    engine, before, opt, a, b = _universal_zero3_fault()
    assert repair_zero3_universal_load(engine, before) == ["param group hyperparameters ['weight_decay']",
                                                           "shared Adam step"]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.state[a]["step"] is not opt.state[b]["step"]
    engine, before, opt, a, b = _universal_zero3_fault()
    unverified("deepspeed", "0.18.0")
    assert repair_zero3_universal_load(engine, before) == []  # DeepSpeed's load stands
    assert opt.param_groups[1]["weight_decay"] == 0.1 and opt.state[a]["step"] is opt.state[b]["step"]
    assert "[compat] repair of ZeRO-3 universal loads: deepspeed 0.18.0 is outside" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuSPARSELt needs CUDA")
def test_cusparselt_knobs_left_alone_outside_verified_torch(capsys, unverified):
    from pipeline.compat.torch_compat import semi_structured_weight

    w = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    w = w * torch.tensor([1, 1, 0, 0], device="cuda", dtype=w.dtype).repeat(128, 32)  # 2:4
    unverified("torch", "2.9.0")
    ws = semi_structured_weight(w, fuse_transpose=True, alg_search_tokens=64)
    assert not getattr(ws, "fuse_transpose_cusparselt", False) and getattr(ws, "alg_id_cusparselt", 0) == 0
    x = torch.randn(64, 128, device="cuda", dtype=w.dtype)
    torch.testing.assert_close(torch.nn.functional.linear(x, ws), torch.nn.functional.linear(x, w), rtol=2e-2,
                               atol=2e-2)
    assert "[compat] cuSPARSELt fused transpose / algorithm search: torch 2.9.0 is outside" in capsys.readouterr().out


def test_torch_private_lookups_fall_back_to_public_answers(capsys, unverified):
    from pipeline.compat.torch_compat import cpu_has_native_bf16, is_persistent_buffer, set_last_lr

    m = torch.nn.Module()
    m.register_buffer("kept", torch.ones(1))
    m.register_buffer("scratch", torch.ones(1), persistent=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    verified = (is_persistent_buffer(m, "kept"), is_persistent_buffer(m, "scratch"))
    set_last_lr(sched, [0.5])
    assert verified == (True, False) and sched.get_last_lr() == [0.5]
    unverified("torch", "2.14.0")
    assert (is_persistent_buffer(m, "kept"), is_persistent_buffer(m, "scratch")) == verified  # via state_dict()
    set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.5]  # torch's own value stands until its next step
    assert cpu_has_native_bf16() is True  # the behaviour before the probe existed
    out = capsys.readouterr().out
    for line in ("non-persistent buffer lookup: torch 2.14.0 is outside", "LR scheduler's last LR: torch 2.14.0",
                 "CPU bf16 detection: torch 2.14.0 is outside the verified range >=2.11,<2.14; bf16 is assumed"):
        assert f"[compat] {line}" in out
