"""pipeline.train.Trainer's named phases on a real tiny model and the tiny stage-01 data, in this process: the order
they run in, a subclass's loss, after-step hook and checkpoint state across a halt and a resume, and SparseTrainer
keeping pruned weights at zero."""

from __future__ import annotations

import pytest
import torch

from pipeline.manifest import read_manifest
from pipeline.metrics import read_metrics
from pipeline.model import ModelConfig, build_model
from pipeline.train import SparseTrainer, TrainConfig, TrainData, Trainer, TrainingHalted

SMALL = ModelConfig(arch="llama", n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=64)


def _cfg(results, run, **kw) -> TrainConfig:
    base = dict(run=run, results_dir=str(results), preset="tiny", model=SMALL, micro_batch_size=2, max_steps=4,
                warmup_steps=1, eval_interval=2, save_interval=2, log_interval=1, precision="fp32", progress=False,
                sample_tokens=0, eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


def _data(results, run) -> TrainData:
    m = read_manifest(results / run / "01_data")
    m["_dir"] = str(results / run / "01_data")
    return TrainData.from_manifest(m)


def _model(data: TrainData, seed: int = 0):
    return build_model(SMALL, 512, data.seq_len, seed=seed)


class Recording(Trainer):
    """Records the phases and carries a counter of its own through the checkpoints."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[str] = []
        self.after = 0

    def plan(self):
        self.calls.append("plan")
        super().plan()

    def prepare_run_dir(self):
        self.calls.append("prepare_run_dir")
        super().prepare_run_dir()

    def setup(self):
        self.calls.append("setup")

    def resume(self):
        self.calls.append("resume")
        super().resume()

    def loss(self, batch):
        loss, _ = super().loss(batch)
        return loss, {"demo/twice": 2 * loss.detach()}

    def after_step(self):
        self.after += 1

    def evaluate(self, at, log=True):
        self.calls.append(f"evaluate{at}")
        return super().evaluate(at, log)

    def save(self, at):
        self.calls.append(f"save{at}")
        super().save(at)

    def checkpoint_state(self):
        return {"after_steps": self.after}

    def restore_state(self, client):
        self.calls.append(f"restore{client['after_steps']}")
        self.after = client["after_steps"]

    def export(self):
        self.calls.append("export")
        return super().export()


def test_phases_run_in_order_and_a_subclass_state_survives_halt_and_resume(tiny_run, clean_env):  # noqa: F811
    results, run = tiny_run
    data = _data(results, run)
    out = results / run / "02_demo"
    t = Recording(_cfg(results, run, halt_after_step=2), _model(data), stage="demo", out_dir=out, tb_dir=None,
                  data=data)
    with pytest.raises(TrainingHalted):
        t.fit()
    assert t.calls == ["plan", "prepare_run_dir", "setup", "resume", "evaluate2", "save2"]
    assert t.after == 2
    assert not (out / "model").exists()

    t = Recording(_cfg(results, run), _model(data, seed=1), stage="demo", out_dir=out, tb_dir=None, data=data)
    r = t.fit()
    assert t.calls == ["plan", "prepare_run_dir", "setup", "resume", "restore2", "evaluate4", "save4", "export"]
    assert t.after == 4 and r.steps == 4 and r.resumed_from.endswith("step2")
    rows = read_metrics(out / "metrics.jsonl")
    twice = {x["step"]: (x["demo/twice"], x["train/loss"]) for x in rows if "demo/twice" in x}
    assert sorted(twice) == [1, 2, 3, 4]  # the loss's extra metric is logged; no step twice after the resume
    assert all(a == pytest.approx(2 * b) for a, b in twice.values())
    assert (out / "model" / "config.json").is_file()


def test_sparse_trainer_keeps_pruned_weights_at_zero(tiny_run, clean_env):  # noqa: F811
    results, run = tiny_run
    data = _data(results, run)
    model = _model(data)
    name = "model.layers.0.mlp.up_proj.weight"
    w = dict(model.named_parameters())[name].detach().clone()  # the engine trains the module's own tensors
    masks = {name: torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5}
    out = results / run / "04_demo"
    r = SparseTrainer(_cfg(results, run, max_steps=3, lr=1e-2), model, masks=masks, stage="demo", out_dir=out,
                      tb_dir=None, data=data).fit()
    from pipeline.sparsity import count_mask_violations, load_export_state_dict

    sd = load_export_state_dict(out / "model")
    assert count_mask_violations(sd, masks) == {name: 0}
    kept = sd[name][masks[name]]
    assert (kept != 0).all() and not torch.equal(kept, w[masks[name]])  # the kept weights trained
    assert r.steps == 3
