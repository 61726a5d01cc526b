"""Shared fixtures and builders: a real tiny stage-01 output (tokenizer + shards) made by ``pipeline.data.prepare``,
tiny real models of every registered architecture, the encoder path's first stages, the test tiers.

Tiers (markers in ``pyproject.toml``): a test module's ``pytestmark`` or a test's own marker says ``integration``
(subprocesses, launchers, stages end to end), ``compat`` (pipeline.compat against the libraries' own paths) or
``gpu`` (needs CUDA); :func:`pytest_collection_modifyitems` adds ``integration`` to ``slow``/``dist`` tests and to
tests using a stage-running fixture, and ``unit`` to every test left in no tier, so ``make test-unit`` (``-m unit``)
runs exactly the rest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
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


#: the markers of the tiers other than ``unit``; a test carrying none of them is a unit test
NON_UNIT_TIERS = ("integration", "compat", "gpu")
#: fixtures that run whole stages (training included) or need an engine's clean process environment: a test using
#: one is an integration test
STAGE_FIXTURES = frozenset({"tiny_run", "clean_env", "pretrained_run", "trained_run", "run_copy", "evaluated",
                            "encoder_run", "pretrained_template"})


def pytest_collection_modifyitems(config, items):
    """Put every test in its tier: ``integration`` when it is marked so, ``slow`` or ``dist``, or uses a fixture of
    :data:`STAGE_FIXTURES`; ``unit`` when it is in none of :data:`NON_UNIT_TIERS`."""
    for item in items:
        names = {m.name for m in item.iter_markers()}
        if "integration" not in names and (names & {"slow", "dist"}
                                           or STAGE_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)
            names.add("integration")
        if not names & set(NON_UNIT_TIERS):
            item.add_marker(pytest.mark.unit)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch):
    """No rank variables in this test's environment (the engine sets single-rank ones for plain python; a launcher's
    would make an in-process stage think it is one rank of many)."""
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)


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


def tiny_llama(kv_heads: int = 4, layers: int = 2, seed: int = 0, vocab: int = 128):
    """A seeded ``LlamaForCausalLM`` (hidden 64, 4 query heads, MLP 192, tied embeddings), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A seeded ``GPT2LMHeadModel`` (2 blocks, hidden 64, 4 heads), in eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0, vocab: int = 50, layers: int = 1, num_labels: int = 3):
    """A seeded ``BertForSequenceClassification`` (hidden 32, 2 heads, MLP 64, 16 positions), in eval mode."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=num_labels, pad_token_id=0)).eval()


def labelled_corpus(path: Path, n: int = 160) -> Path:
    """A JSON-lines corpus of ``n`` passages labelled ``royal``/``noble`` (alternating) in 16 groups (plays)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        royal = i % 2 == 0
        subj = rng.choice(["The king", "The queen"] if royal else ["A lord", "The lady"])
        words = [f"{subj} {rng.choice(['walks into', 'speaks of', 'brings'])} "
                 f"{rng.choice(['the castle', 'the crown', 'a letter'])}." for _ in range(6)]
        rows.append({"text": " ".join(words), "label": "royal" if royal else "noble", "group": f"play{i % 16}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_encoder_stages(results_dir: Path, corpus: Path, *pretrain_args: str) -> tuple[list[str], dict]:
    """The encoder path's stage 01 (``corpus``, seq_len 32, 10% validation) and stage 02 (masked-LM pretraining:
    4 steps, evaluated and saved at step 4, unless ``pretrain_args`` (``--key value`` pairs) say otherwise) of run
    ``r`` under ``results_dir``, in process.

    Returns ``(common CLI arguments of the run, stage 02's manifest)``.
    """
    import importlib.util

    from pipeline.config import parse_cli
    from pipeline.data import DataConfig, prepare
    from pipeline.encoder import EncoderTrainConfig

    common = ["--run", "r", "--results_dir", str(results_dir), "--preset", "encoder-tiny"]
    prepare(parse_cli(DataConfig, [*common, "--data", str(corpus), "--val_fraction", "0.1", "--seq_len", "32"],
                      "data"))
    spec = importlib.util.spec_from_file_location("pe", ROOT / "scripts" / "pretrain_encoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts = {"--max_steps": "4", "--eval_interval": "4", "--save_interval": "4", "--progress": "false",
            **dict(zip(pretrain_args[::2], pretrain_args[1::2]))}
    args = [x for kv in opts.items() for x in kv]
    return common, mod.main(parse_cli(EncoderTrainConfig, [*common, *args], "pretrain"))


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
