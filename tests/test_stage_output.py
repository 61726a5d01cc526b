"""pipeline.stage_output: the one way every stage writes its output folder (hash check, --overwrite, staging or
in place, TensorBoard folder, manifest last)."""

from __future__ import annotations

import json

import pytest

from pipeline.manifest import StageError, read_manifest, write_manifest
from pipeline.stage_output import StageOutput


def _finished(out, chash, files=("a.txt",)):
    out.mkdir(parents=True)
    for f in files:
        (out / f).write_text("old")
    write_manifest(out, "demo", {}, {"config_hash": chash})


def test_check_refuses_another_configuration_without_overwrite(tmp_path):
    out = tmp_path / "03_demo"
    _finished(out, "aaaa")
    so = StageOutput(out)
    so.check("aaaa", overwrite=False, stage="demo")  # the same configuration: accepted
    so.check("bbbb", overwrite=True, stage="demo")  # another, with --overwrite: accepted
    so.check("bbbb", overwrite=False, stage="demo", also_accept=("aaaa",))  # the old hash of this configuration
    with pytest.raises(StageError, match="--overwrite") as e:
        so.check("bbbb", overwrite=False, stage="demo")
    assert "aaaa" in str(e.value) and "bbbb" in str(e.value)
    assert (out / "a.txt").read_text() == "old"  # nothing changed


def test_staged_write_replaces_the_output_and_tensorboard_with_the_manifest_last(tmp_path):
    out, tb = tmp_path / "run" / "03_demo", tmp_path / "run" / "tb" / "demo"
    _finished(out, "aaaa", files=("a.txt", "stale.txt"))
    tb.mkdir(parents=True)
    (tb / "old.events").write_text("old")
    so = StageOutput(out, tb)
    seen = {}
    with so.staging() as st:
        assert st.dir.parent == out.parent and st.dir.name.startswith(".03_demo.partial-")
        assert st.tb_dir is not None and st.tb_dir.parent == tb.parent
        (st.dir / "a.txt").write_text("new")
        st.tb_dir.mkdir()
        (st.tb_dir / "new.events").write_text("new")
        assert read_manifest(out)["outputs"]["config_hash"] == "aaaa"  # the old output untouched meanwhile

        def manifest(d):
            seen["files"] = sorted(p.name for p in d.iterdir())  # everything else is in place first
            return write_manifest(d, "demo", {}, {"config_hash": "bbbb"})

        m = st.publish(manifest)
    assert m["outputs"]["config_hash"] == "bbbb"
    assert seen["files"] == ["a.txt"]  # the old output's files (and manifest) are gone, no manifest yet
    assert (out / "a.txt").read_text() == "new" and not (out / "stale.txt").exists()
    assert read_manifest(out)["outputs"]["config_hash"] == "bbbb"
    assert sorted(p.name for p in tb.iterdir()) == ["new.events"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["03_demo", "tb"]  # no temporary or old folder left
    assert sorted(p.name for p in tb.parent.iterdir()) == ["demo"]


def test_a_failed_staged_write_leaves_the_previous_output(tmp_path):
    out, tb = tmp_path / "03_demo", tmp_path / "tb" / "demo"
    _finished(out, "aaaa")
    tb.mkdir(parents=True)
    (tb / "old.events").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), StageOutput(out, tb).staging() as st:
        (st.dir / "a.txt").write_text("half-written")
        st.tb_dir.mkdir()
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old" and read_manifest(out)["outputs"]["config_hash"] == "aaaa"
    assert (tb / "old.events").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["03_demo", "tb"]
    assert sorted(p.name for p in tb.parent.iterdir()) == ["demo"]


def test_staged_write_into_a_new_folder(tmp_path):
    out = tmp_path / "run" / "01_demo"
    with StageOutput(out).staging() as st:  # no TensorBoard folder
        assert st.tb_dir is None
        (st.dir / "x").write_text("1")
        st.publish(lambda d: write_manifest(d, "demo", {}, {"config_hash": "c"}))
    assert (out / "x").read_text() == "1" and read_manifest(out)["complete"]


def test_in_place_fresh_start_and_resume(tmp_path):
    out, tb = tmp_path / "02_demo", tmp_path / "tb" / "demo"
    _finished(out, "aaaa")
    ckpts = out / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step2").mkdir()
    rows = [{"step": s, "train/loss": 1.0} for s in (1, 2, 3, 4)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "tr')
    tb.mkdir(parents=True)
    so = StageOutput(out, tb)
    so.begin_in_place(resume_step=2, also_fresh=(ckpts,))  # a resume: rows past step 2 (and a cut line) go
    assert not (out / "manifest.json").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (ckpts / "step2").is_dir() and tb.is_dir()
    so.begin_in_place(resume_step=None, also_fresh=(ckpts,))  # a fresh start: logs, checkpoints, TensorBoard go
    assert not (out / "metrics.jsonl").exists() and not ckpts.exists() and not tb.exists()
    assert (out / "a.txt").exists()  # other files stay (the export is replaced by the trainer)
