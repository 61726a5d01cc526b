"""The encoder path, stage 02: a BERT-style encoder (``BertForMaskedLM``) pretrained with the masked-LM objective.

The stage-01 shards are the same flat token streams as the decoder's (documents joined by EOS); an encoder
block is ``[CLS]`` followed by the first ``seq_len - 1`` tokens of a stage-01 block, so the model sees
``seq_len`` positions and no padding.  Masking follows BERT (Devlin et al., 2019, section 3.1 and appendix
A.1) exactly as ``transformers.DataCollatorForLanguageModeling`` does: 15% of the non-special tokens are
chosen; of those 80% become ``[MASK]``, 10% a random token, 10% stay as they are; the loss is the
cross-entropy over the chosen tokens only.  :func:`mask_tokens` is that rule on tensors already on the
device (the collator works on CPU lists and reads the tokenizer per row), with an optional generator for
the fixed, seeded masking of the validation split.

Stage 01 adds ``[CLS] [SEP] [MASK]`` (and a post-processor writing ``[CLS] text [SEP]``) to the tokenizer
when run with ``--task classify`` (:func:`add_encoder_tokens`); the decoder's tokenizer is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import doc
from pipeline.train import TrainConfig

CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
IGNORE_INDEX = -100  #: label of a token that is not predicted (PyTorch's cross_entropy default)


# ---------------------------------------------------------------------------------------------
# tokenizer


def add_encoder_tokens(tokenizer: Any) -> Any:
    """Give a stage-01 tokenizer BERT's special tokens, in place, and return it.

    Adds ``[CLS]``, ``[SEP]`` and ``[MASK]`` as special tokens (``tokenizer.add_special_tokens``: new ids after
    the trained vocabulary) and a ``tokenizers`` post-processor so that ``tokenizer(text)`` gives
    ``[CLS] text [SEP]`` and a pair ``[CLS] a [SEP] b [SEP]`` (token type 1 for ``b``), as BERT's tokenizer does.
    """
    from tokenizers.processors import TemplateProcessing

    tokenizer.add_special_tokens({"cls_token": CLS, "sep_token": SEP, "mask_token": MASK})
    cls_id, sep_id = tokenizer.convert_tokens_to_ids(CLS), tokenizer.convert_tokens_to_ids(SEP)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return tokenizer


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of every special token of ``tokenizer`` (never masked, never a classification passage's content)."""
    return sorted({int(i) for i in tokenizer.all_special_ids})


def require_encoder_tokenizer(tokenizer: Any, where: str) -> None:
    """Raise ``ValueError`` naming the fix when ``tokenizer`` lacks ``[CLS]``/``[SEP]``/``[MASK]``."""
    missing = [n for n in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, n) is None]
    if missing:
        raise ValueError(f"{where}: the stage-01 tokenizer has no {', '.join(missing)} (it was made for the decoder); "
                         f"remake stage 01 with --task classify (make data TASK=classify)")


# ---------------------------------------------------------------------------------------------
# masking


def mask_tokens(input_ids: torch.Tensor, special_ids: torch.Tensor | list[int], mask_id: int, vocab_size: int,
                mlm_probability: float = 0.15, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a batch of token ids (the rule of ``DataCollatorForLanguageModeling.torch_mask_tokens``).

    Each token that is not special is chosen with probability ``mlm_probability``; a chosen token becomes
    ``mask_id`` with probability ``mask_replace_prob``, else a uniformly random id in ``[0, vocab_size)`` with
    probability ``random_replace_prob / (1 - mask_replace_prob)``, else stays.  Special tokens (padding
    included) are never chosen.

    Args:
        input_ids: int64 ``(B, T)`` on any device; not modified.
        special_ids: ids never chosen (:func:`special_token_ids`).
        mask_id, vocab_size: the ``[MASK]`` id and the embedding's row count.
        generator: a ``torch.Generator`` on ``input_ids``' device for reproducible masking (``None``: the
            device's default generator, whose state the training checkpoints save).

    Returns:
        ``(masked_ids, labels)``, both int64 ``(B, T)``: ``labels`` holds the original id at chosen positions and
        :data:`IGNORE_INDEX` elsewhere.

    Raises:
        ValueError: for probabilities outside [0, 1] or ``mask_replace_prob + random_replace_prob > 1``.
    """
    if not (0.0 <= mlm_probability <= 1.0 and 0.0 <= mask_replace_prob <= 1.0 and 0.0 <= random_replace_prob <= 1.0
            and mask_replace_prob + random_replace_prob <= 1.0):
        raise ValueError(f"masking probabilities out of range: mlm_probability {mlm_probability}, mask_replace_prob "
                         f"{mask_replace_prob}, random_replace_prob {random_replace_prob} (each in [0, 1], the last "
                         f"two summing to at most 1)")
    dev = input_ids.device
    special = torch.isin(input_ids, torch.as_tensor(special_ids, dtype=input_ids.dtype, device=dev))
    prob = torch.full(input_ids.shape, mlm_probability, device=dev).masked_fill_(special, 0.0)
    chosen = torch.bernoulli(prob, generator=generator).bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, mask_replace_prob, device=dev), generator=generator).bool()
    to_mask &= chosen
    masked[to_mask] = mask_id
    rest = 1.0 - mask_replace_prob
    p_random = random_replace_prob / rest if rest > 0 else 0.0
    to_random = torch.bernoulli(torch.full(input_ids.shape, p_random, device=dev), generator=generator).bool()
    to_random &= chosen & ~to_mask
    randoms = torch.randint(vocab_size, input_ids.shape, device=dev, generator=generator, dtype=input_ids.dtype)
    masked[to_random] = randoms[to_random]
    return masked, labels


def encoder_block(batch: torch.Tensor, cls_id: int) -> torch.Tensor:
    """``[CLS]`` + the first ``T - 1`` tokens of each stage-01 block ``(B, T + 1)`` -> int64 ``(B, T)``."""
    cls = torch.full((batch.size(0), 1), cls_id, dtype=batch.dtype, device=batch.device)
    return torch.cat([cls, batch[:, :-2]], dim=1)


def masked_lm_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy in nats, correct predictions, predicted tokens) over the chosen positions, fp32."""
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    lg = logits.reshape(-1, logits.size(-1))[keep].float()
    tgt = flat[keep]
    ce = F.cross_entropy(lg, tgt, reduction="sum") if tgt.numel() else lg.sum() * 0.0
    correct = (lg.argmax(-1) == tgt).sum().float() if tgt.numel() else ce * 0.0
    return ce, correct, keep.sum().float()


@dataclass
class MLMSpec:
    """What the masked-LM loss needs to know about the tokenizer and the rule."""

    cls_id: int
    mask_id: int
    vocab_size: int
    special_ids: list[int]
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, **rule: float) -> MLMSpec:
        require_encoder_tokenizer(tokenizer, "masked-LM pretraining")
        return cls(cls_id=int(tokenizer.cls_token_id), mask_id=int(tokenizer.mask_token_id), vocab_size=vocab_size,
                   special_ids=special_token_ids(tokenizer), **rule)

    def mask(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        return mask_tokens(ids, self.special_ids, self.mask_id, self.vocab_size, self.mlm_probability,
                           self.mask_replace_prob, self.random_replace_prob, generator)


def make_mlm_loss(spec: MLMSpec):
    """The stage-02 ``loss_fn`` for :class:`pipeline.train.Trainer`: mean masked-LM cross-entropy (nats per
    predicted token) of a batch of stage-01 blocks, masked afresh with the device's generator, plus
    ``mlm/accuracy`` (share of predicted tokens whose argmax is right) as an extra metric."""

    def loss_fn(model: Any, batch: torch.Tensor):
        ids = encoder_block(batch, spec.cls_id)
        masked, labels = spec.mask(ids)
        logits = model(input_ids=masked).logits
        ce, correct, n = masked_lm_sums(logits, labels)
        n = n.clamp(min=1.0)
        return ce / n, {"mlm/accuracy": correct / n}

    return loss_fn


def make_mlm_eval(spec: MLMSpec, seed: int):
    """The stage-02 ``eval_fn``: masked-LM loss and accuracy over the whole validation split, each block masked
    with its own generator seeded from ``(seed, block index)``, so the masking is the same at every evaluation,
    for every world size and batch size.  Blocks are strided across ranks (:func:`pipeline.sampler.eval_shard`)
    and the sums all-reduced.  Every rank must call it (collective)."""
    from pipeline.sampler import eval_shard
    from pipeline.train import _all_reduce_sum

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def masked_block(val: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in cache:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
            ids = encoder_block(val[i].unsqueeze(0), spec.cls_id)
            m, lab = spec.mask(ids, generator=g)
            cache[i] = (m[0], lab[0])
        return cache[i]

    @torch.no_grad()
    def eval_fn(model: Any, val: Any, batch_size: int, device: Any, world: int, rank: int):
        was_training = getattr(model, "training", False)
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for idx in eval_shard(len(val), world, rank, batch_size):
            pairs = [masked_block(val, max(i, 0)) for i in idx]
            masked = torch.stack([p[0] for p in pairs]).to(device)
            labels = torch.stack([p[1] if i >= 0 else torch.full_like(p[1], IGNORE_INDEX)
                                  for i, p in zip(idx, pairs)]).to(device)
            logits = model(input_ids=masked).logits  # every rank, same number of forwards (ZeRO-3 gathers)
            ce, correct, n = masked_lm_sums(logits, labels)
            sums += torch.stack([ce, correct, n]).double()
        _all_reduce_sum(sums)  # collective: every rank
        if was_training:
            model.train()
        loss = (sums[0] / sums[2].clamp(min=1)).item()
        return loss, {"val/mlm_accuracy": (sums[1] / sums[2].clamp(min=1)).item(),
                      "val/mlm_ppl": math.exp(min(loss, 700.0)), "val/mlm_tokens": sums[2].item()}

    return eval_fn


# ---------------------------------------------------------------------------------------------
# model


@dataclass
class EncoderModelConfig:
    """Shape of a BERT encoder (``transformers.BertConfig``; dotted CLI keys ``--model.n_layer 4``)."""

    arch: str = doc("Architecture: 'bert' (post-LayerNorm BERT, GELU MLP, learned positions).", "bert")
    n_layer: int = doc("Number of transformer blocks (BertConfig.num_hidden_layers).", 4)
    d_model: int = doc("Hidden size (BertConfig.hidden_size).", 256)
    n_head: int = doc("Attention heads; must divide d_model.", 4)
    d_ff: int = doc("MLP inner width (BertConfig.intermediate_size).", 1024)
    max_position: int = doc("Longest sequence the model accepts; 0 = the stage-01 seq_len.", 0)
    dropout: float = doc("Dropout of the hidden states and attention probabilities (BERT: 0.1).", 0.1)
    tie_embeddings: bool = doc("Share the token embedding with the masked-LM decoder (as BERT).", True)

    def validate(self, prefix: str = "model.") -> list[str]:
        p = []
        if self.arch != "bert":
            p.append(f"{prefix}arch must be 'bert' for the encoder path, got '{self.arch}'")
        for name in ("n_layer", "d_model", "n_head", "d_ff"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}{name} must be positive, got {getattr(self, name)}")
        if self.n_head >= 1 and self.d_model % self.n_head:
            p.append(f"{prefix}d_model ({self.d_model}) must be divisible by {prefix}n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"{prefix}dropout must be in [0, 1), got {self.dropout}")
        if self.max_position < 0:
            p.append(f"{prefix}max_position must be >= 0 (0 = seq_len), got {self.max_position}")
        return p


def bert_config(mcfg: EncoderModelConfig, vocab_size: int, seq_len: int, pad_id: int | None):
    """The ``transformers.BertConfig`` of ``mcfg`` (one token type; positions ``max_position or seq_len``).

    Raises:
        ValueError: listing every problem with the shape.
    """
    from transformers import BertConfig

    problems = mcfg.validate()
    max_pos = mcfg.max_position or seq_len
    if max_pos < seq_len:
        problems.append(f"model.max_position ({max_pos}) is shorter than seq_len ({seq_len})")
    if problems:
        raise ValueError("invalid encoder configuration: " + "; ".join(problems))
    return BertConfig(vocab_size=vocab_size, hidden_size=mcfg.d_model, num_hidden_layers=mcfg.n_layer,
                      num_attention_heads=mcfg.n_head, intermediate_size=mcfg.d_ff, max_position_embeddings=max_pos,
                      hidden_dropout_prob=mcfg.dropout, attention_probs_dropout_prob=mcfg.dropout, type_vocab_size=2,
                      pad_token_id=pad_id, tie_word_embeddings=mcfg.tie_embeddings, hidden_act="gelu")


def build_encoder(mcfg: EncoderModelConfig, vocab_size: int, seq_len: int, pad_id: int | None,
                  seed: int | None = None):
    """A freshly initialised ``BertForMaskedLM`` (fp32, CPU, SDPA attention); ``seed`` seeds the initialisation
    so every rank builds the same weights."""
    from transformers import AutoModelForMaskedLM

    config = bert_config(mcfg, vocab_size, seq_len, pad_id)
    if seed is not None:
        torch.manual_seed(seed)
    # the public entry: it calls BertForMaskedLM._from_config with the same arguments
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# stage 02 configuration


@dataclass
class EncoderTrainConfig(TrainConfig):
    """Stage 02 of the encoder path (preset section ``pretrain`` of an encoder preset)."""

    model: EncoderModelConfig = doc("Encoder shape (dotted keys: --model.n_layer 4).",
                                    default_factory=EncoderModelConfig)
    mlm_probability: float = doc("Share of non-special tokens chosen for prediction (BERT: 0.15).", 0.15)
    mask_replace_prob: float = doc("Share of the chosen tokens replaced by [MASK] (BERT: 0.8).", 0.8)
    random_replace_prob: float = doc("Share of the chosen tokens replaced by a random token (BERT: 0.1).", 0.1)
    weight_decay: float = doc("AdamW decoupled weight decay (matrices only; BERT: 0.01).", 0.01)
    betas: list[float] = doc("AdamW (beta1, beta2) (BERT: 0.9, 0.999).", default_factory=lambda: [0.9, 0.999])
    sample_tokens: int = doc("Unused by the encoder (no text sample); must be 0.", 0)

    def validate(self) -> list[str]:
        p = super().validate()
        if self.sample_tokens:
            p.append("sample_tokens must be 0 for the encoder (a masked LM generates no text)")
        if not (0.0 < self.mlm_probability <= 1.0 and 0.0 <= self.mask_replace_prob <= 1.0
                and 0.0 <= self.random_replace_prob <= 1.0
                and self.mask_replace_prob + self.random_replace_prob <= 1.0):
            p.append("mlm_probability must be in (0, 1], mask_replace_prob and random_replace_prob in [0, 1] "
                     "with a sum of at most 1")
        if self.init_from:
            p.append("init_from is not supported by the encoder path yet (a fresh BertForMaskedLM is built)")
        return p
