"""The classification stage under Horovod (``--backend horovod``): two CPU ranks started by ``horovodrun --gloo``;
the distributed test evaluation counts every passage once and equals one process scoring the export, and the run
writes its model and manifest as the DeepSpeed path does.  Skipped where Horovod is not installed
(``scripts/install_horovod.sh``); the missing-Horovod error is tested everywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_encoder_dist import _check_against_one_process, encoder_run  # noqa: F401  (a fixture)
from tests.test_pretrain_dist import ROOT, _check, _env


def _horovod_reason() -> str | None:
    try:
        import horovod.torch  # noqa: F401
    except ImportError as e:
        return f"Horovod with its PyTorch extension is not importable ({e}); scripts/install_horovod.sh builds it"
    return None


@pytest.mark.dist
@pytest.mark.skipif(_horovod_reason() is not None, reason=str(_horovod_reason()))
def test_classify_two_ranks_horovodrun(encoder_run):  # noqa: F811
    from pipeline.manifest import read_manifest

    results, corpus, common = encoder_run
    cmd = [sys.executable, "-m", "horovod.runner.launch", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
           "scripts/classify.py", *common, "--data", str(corpus), "--backend", "horovod", "--max_steps", "6",
           "--eval_interval", "3", "--progress", "false"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    _check(p)
    _check_against_one_process(results, corpus, common, "horovodrun", None)
    out = results / "r" / "02b_classify"
    m = read_manifest(out)
    assert m["outputs"]["backend"] == "horovod" and m["metrics"]["steps"] == 6
    assert (out / "model" / "model.safetensors").is_file() and (out / "confusion_matrix.png").is_file()
    assert not (out / "checkpoints").exists()
    rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if '"val/macro_f1"' in r]
    assert len(rows) == 2  # validation at steps 3 and 6, logged once (rank 0 only)


def test_horovod_backend_missing_names_the_install(tmp_path, monkeypatch):
    from pipeline.classify import ClassifyConfig
    from pipeline.config import parse_cli
    from pipeline.horovod_backend import HorovodBackend
    from pipeline.manifest import StageError

    monkeypatch.setitem(sys.modules, "horovod", None)  # import horovod -> ImportError, as where it is not installed
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    cfg = parse_cli(ClassifyConfig, ["--run", "r", "--results_dir", str(tmp_path), "--preset", "encoder-tiny",
                                     "--backend", "horovod"], "classify")
    with pytest.raises(StageError, match=r"scripts/install_horovod\.sh"):
        HorovodBackend(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything is written
    cfg.precision = "fp16"
    with pytest.raises(StageError, match="trains in fp32"):
        HorovodBackend(cfg)


@pytest.mark.integration
def test_script_under_horovodrun_without_backend_is_refused(tmp_path):
    env = {**_env(), "HOROVOD_RANK": "0"}
    p = subprocess.run([sys.executable, "scripts/classify.py", "--run", "r", "--results_dir", str(tmp_path),
                        "--preset", "encoder-tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--backend horovod" in p.stderr, p.stderr[-2000:]
    assert not any(tmp_path.iterdir())
