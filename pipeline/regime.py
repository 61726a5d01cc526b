"""Data-regime diagnostics of a training run: how much data the model saw, how often, and whether it overfits.

A run can only be judged against its controls once its data regime is stated: a 97.5M-parameter model that
saw 1.33M training tokens 3.7 times (0.05 tokens per parameter) is data-starved, and a smaller model trained on
the same data may beat it.  The figures, all from numbers the training loop already has:

- **tokens per parameter** ``D / N``: training tokens processed (``D``, repeats counted) over parameters (``N``,
  tied weights once, :func:`pipeline.model.count_params`).  The compute-optimal ratio of Hoffmann et al. (2022,
  "Training Compute-Optimal Large Language Models", the Chinchilla paper) is about 20.
- **epochs** ``D / D_train``: passes over the training split, ``D_train`` being the tokens one epoch offers
  (blocks × seq_len: the tokens predicted once per epoch, :class:`pipeline.tokens.BlockDataset`).  Muennighoff et
  al. (2023, "Scaling Data-Constrained Language Models") find repeated data worth nearly as much as new data up
  to about 4 epochs and quickly less after: the warning threshold here.
- **train/validation gap**: validation loss minus the mean of the training losses logged since the previous
  evaluation (nats per token); a growing positive gap is memorisation.
- **validation loss rising**: the latest validation loss exceeds the lowest earlier one by more than
  ``rise_tol`` nats.

:func:`data_regime` computes them from plain numbers (hand-checkable); :class:`RegimeTracker` follows a run
through :class:`pipeline.train.Trainer` and gives the TensorBoard scalars ``regime/*`` at every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: compute-optimal training tokens per parameter (Hoffmann et al., 2022)
CHINCHILLA_TOKENS_PER_PARAM = 20.0
#: epochs beyond which repeated data is worth clearly less than new data (Muennighoff et al., 2023)
MAX_EPOCHS = 4.0
#: nats per token by which the latest validation loss must exceed the best earlier one to count as rising
RISE_TOL = 0.01


def data_regime(n_params: int, train_tokens: int, tokens_seen: int, train_losses: Sequence[float] = (),
                val_history: Sequence[tuple[int, float]] = (), max_epochs: float = MAX_EPOCHS,
                rise_tol: float = RISE_TOL) -> dict[str, Any]:
    """The data-regime figures of a run at one point.

    Args:
        n_params: parameters of the model (``N``).
        train_tokens: tokens one epoch over the training split offers (blocks × seq_len).
        tokens_seen: training tokens processed so far, all ranks, repeats counted (steps × global batch × seq_len).
        train_losses: training losses (nats/token) logged since the previous evaluation; their mean is the
            training side of the gap (empty: no gap).
        val_history: ``(step, val_loss)`` of every evaluation so far, in order; the last is the current one.
        max_epochs: warn beyond this many epochs.
        rise_tol: nats per token by which the last validation loss must exceed the best earlier one to count
            as rising.

    Returns:
        ``tokens_per_param``, ``chinchilla_fraction`` (tokens per parameter / 20), ``epochs``, ``train_loss``,
        ``val_loss``, ``train_val_gap`` (``val_loss - train_loss``; ``None`` without both), ``best_val_loss``,
        ``best_val_step``, ``val_rising`` (bool), ``warnings``: one plain sentence per problem found (more
        than ``max_epochs`` epochs; validation loss rising), and ``warning_kinds`` (``epochs``, ``val_rising``)
        in the same order.

    Raises:
        ValueError: ``n_params`` or ``train_tokens`` not positive, or ``tokens_seen`` negative.
    """
    if n_params < 1 or train_tokens < 1 or tokens_seen < 0:
        raise ValueError(f"n_params ({n_params}) and train_tokens ({train_tokens}) must be positive and tokens_seen "
                         f"({tokens_seen}) >= 0")
    tpp = tokens_seen / n_params
    epochs = tokens_seen / train_tokens
    finite = [float(x) for x in train_losses if x is not None and math.isfinite(float(x))]
    train_loss = sum(finite) / len(finite) if finite else None
    vals = [(int(s), float(v)) for s, v in val_history if v is not None and math.isfinite(float(v))]
    val_loss = vals[-1][1] if vals else None
    best_step, best = min(vals, key=lambda sv: sv[1]) if vals else (None, None)
    earlier = [v for _, v in vals[:-1]]
    rising = bool(earlier) and val_loss > min(earlier) + rise_tol
    warnings = {}
    if epochs > max_epochs:
        warnings["epochs"] = (f"the run repeats its training data {epochs:.1f} times ({tokens_seen:,} tokens over a "
                              f"{train_tokens:,}-token split), more than {max_epochs:g} epochs: repeated tokens are "
                              f"worth less than new ones and the model may memorise; add data or train a smaller model")
    if rising:
        warnings["val_rising"] = (f"validation loss is rising: {val_loss:.4f} at step {vals[-1][0]}, above its best "
                                  f"{best:.4f} at step {best_step} (overfitting; fewer steps or more data)")
    return {
        "n_params": int(n_params), "train_tokens": int(train_tokens), "tokens_seen": int(tokens_seen),
        "tokens_per_param": tpp, "chinchilla_fraction": tpp / CHINCHILLA_TOKENS_PER_PARAM, "epochs": epochs,
        "train_loss": train_loss, "val_loss": val_loss,
        "train_val_gap": (val_loss - train_loss) if val_loss is not None and train_loss is not None else None,
        "best_val_loss": best, "best_val_step": best_step, "val_rising": rising, "warnings": list(warnings.values()),
        "warning_kinds": list(warnings),
    }


class RegimeTracker:
    """Follows a training run's data regime, one call per evaluation (rank 0 logs what it returns).

    Args:
        n_params: parameters of the trained model.
        train_tokens: tokens one epoch over the training split offers (blocks × seq_len).
        max_epochs, rise_tol: as in :func:`data_regime`.
    """

    def __init__(self, n_params: int, train_tokens: int, max_epochs: float = MAX_EPOCHS, rise_tol: float = RISE_TOL):
        self.n_params, self.train_tokens = int(n_params), int(train_tokens)
        self.max_epochs, self.rise_tol = max_epochs, rise_tol
        self.val_history: list[tuple[int, float]] = []
        self.last: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._prev_eval_step = 0

    def at_eval(self, step: int, tokens_seen: int, val_loss: float,
                history: dict[str, list] | None = None) -> tuple[dict[str, float], list[str]]:
        """Record the evaluation at ``step``; return the scalars to log and the warnings not given before.

        Args:
            history: the loop's logged training losses, ``{"step": [...], "loss": [...]}``; those logged after
                the previous evaluation (up to ``step``) make the training side of the gap.

        Returns:
            ``({"regime/tokens_per_param", "regime/epochs", "regime/val_rising", "regime/train_val_gap"?: ...},
            [warning lines])``; each kind of warning is returned once per run.
        """
        if self.val_history and self.val_history[-1][0] == step:
            self.val_history.pop()  # the same step evaluated again (a resumed run at its last step)
        self.val_history.append((int(step), float(val_loss)))
        losses = []
        if history:
            losses = [v for s, v in zip(history.get("step", []), history.get("loss", []))
                      if self._prev_eval_step < s <= step]
        self._prev_eval_step = int(step)
        r = data_regime(self.n_params, self.train_tokens, tokens_seen, losses, self.val_history,
                        self.max_epochs, self.rise_tol)
        self.last = r
        scalars = {"regime/tokens_per_param": r["tokens_per_param"], "regime/epochs": r["epochs"],
                   "regime/val_rising": float(r["val_rising"])}
        if r["train_val_gap"] is not None:
            scalars["regime/train_val_gap"] = r["train_val_gap"]
        new = []
        for kind, w in zip(r["warning_kinds"], r["warnings"]):
            if kind not in self._warned:
                self._warned.add(kind)
                new.append(w)
        return scalars, new

    def summary(self) -> dict[str, Any]:
        """The figures at the last evaluation, with ``val_history``, for the stage's manifest (``{}`` before any)."""
        if self.last is None:
            return {}
        return {**self.last, "val_history": [list(x) for x in self.val_history],
                "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM, "max_epochs": self.max_epochs,
                "rise_tol": self.rise_tol}
