"""Shared fixtures: a real tiny stage-01 output (tokenizer + shards) made by ``pipeline.data.prepare``."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the virtual environment's bin folder (deepspeed / accelerate launchers live beside the interpreter)
BIN = Path(sys.executable).parent

def _default_accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


os.environ.setdefault("DS_ACCELERATOR", _default_accelerator())

#: rank variables a test may set in this process; a child process must not inherit them from here
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PIPELINE_LAUNCHER")


@pytest.fixture(autouse=True)
def _isolated_rank_environment():
    """Tests that build an engine in-process set rank variables; restore them so later subprocesses (which
    would read them as a launcher's) start clean."""
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_WORDS = ("the king queen lord lady speaks walks sleeps into castle garden night morning sword crown letter "
          "brings takes gives loves hates and but then when while with from under over").split()


def make_corpus(folder: Path, n_docs: int = 24, sentences: int = 60, seed: int = 0) -> list[Path]:
    """Write ``n_docs`` small text files of simple, repetitive sentences (so a tiny model learns quickly)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(n_docs):
        lines = []
        for _ in range(sentences):
            subj = rng.choice(["The king", "The queen", "A lord", "The lady"])
            verb = rng.choice(["walks into", "sleeps in", "speaks of", "brings"])
            obj = rng.choice(["the castle", "the garden", "a sword", "the crown", "a letter"])
            tail = rng.choice(["at night.", "in the morning.", "with love.", "and then leaves."])
            lines.append(f"{subj} {verb} {obj} {tail}")
        p = folder / f"doc{d:03d}.txt"
        p.write_text("\n".join(lines) + "\n")
        paths.append(p)
    return paths


def make_data_stage(results_dir: Path, run: str, corpus: Path, seq_len: int = 64, vocab_size: int = 512) -> Path:
    """Run the real stage 01 on ``corpus``; returns ``results_dir/run/01_data``."""
    from pipeline.data import DataConfig, prepare

    cfg = DataConfig(run=run, results_dir=str(results_dir), preset="tiny", data=[str(corpus)],
                     vocab_size=vocab_size, seq_len=seq_len, val_fraction=0.15, seed=0)
    prepare(cfg)
    return results_dir / run / "01_data"


@pytest.fixture(scope="session")
def tiny_data_template(tmp_path_factory) -> Path:
    """A results folder holding run ``tmpl`` with a finished tiny stage 01 (made once per session)."""
    base = tmp_path_factory.mktemp("data_template")
    corpus = base / "corpus"
    make_corpus(corpus)
    make_data_stage(base / "results", "tmpl", corpus)
    return base / "results" / "tmpl" / "01_data"


@pytest.fixture
def tiny_run(tiny_data_template, tmp_path) -> tuple[Path, str]:
    """(results_dir, run) with a copy of the tiny stage 01 under ``results_dir/run/01_data``."""
    results = tmp_path / "results"
    shutil.copytree(tiny_data_template, results / "r" / "01_data")
    return results, "r"


@pytest.fixture
def unverified(monkeypatch):
    """``unverified(lib, version)``: ``pipeline.compat`` sees ``version`` of ``lib`` installed (a version outside
    its verified range), and each workaround's fallback line is printed again in this test."""
    import pipeline.compat as compat

    monkeypatch.setattr(compat, "_logged", set())
    real = compat.version_of
    fake: dict[str, str] = {}
    monkeypatch.setattr(compat, "version_of", lambda lib: fake.get(lib) or real(lib))

    def set_version(lib: str, version: str) -> None:
        fake[lib] = version

    return set_version
