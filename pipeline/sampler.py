"""Data order for data-parallel training: deterministic, disjoint across ranks, resumable.

The training stream is the concatenation of per-epoch permutations of the block indices
``perm(seed, 0) ++ perm(seed, 1) ++ ...``, each cut to a whole number of global batches (a batch never
straddles two epochs, so it never holds a block twice); each permutation is a function of ``(seed, epoch)`` alone
(``torch.randperm`` with its own generator), so every epoch is reshuffled and every rank computes the
same stream without communicating.  An optimizer step consumes the next *global batch* of
``G = micro_batch × grad_accum × world_size`` indices of the stream; micro step ``k`` of rank ``r``
takes the slice ``[(k·W + r)·B, (k·W + r + 1)·B)`` of it, so the ranks' samples are disjoint and
together are exactly the global batch, whatever the split into ranks and accumulation steps.

The position in the stream (``epoch``, ``offset``) is the sampler's state, saved in the checkpoint:
a resumed run continues with the next unseen sample, neither repeating nor skipping one.
Validation uses :func:`eval_shard`: the whole split, strided across ranks, no index twice.
"""

from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` (int64 tensor of shape ``(n,)``) depending only on ``seed`` and ``epoch``."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class GlobalBatchSampler:
    """Yields, for one rank, the indices of its micro-batches, one optimizer step (global batch) at a time.

    Args:
        n_samples: blocks in the training split (``len(BlockDataset)``).
        micro_batch_size: samples per micro-batch per rank (``B``).
        grad_accum: micro-batches per optimizer step (``A``).
        world_size, rank: data-parallel size and this process's rank.
        seed: seed of the order.

    Raises:
        ValueError: when the split holds fewer samples than one global batch, or an argument is out of range.
    """

    def __init__(self, n_samples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, world_source: str | None = None):
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, "
                             f"world_size={world_size}, rank={rank}")
        self.n = int(n_samples)
        self.micro = int(micro_batch_size)
        self.accum = int(grad_accum)
        self.world = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.global_batch = self.micro * self.accum * self.world
        if self.n < self.global_batch:
            raise ValueError(
                f"the training split has {self.n} blocks, fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size {self.micro} x grad_accum {self.accum} x world_size {self.world}"
                + (f"; world size from {world_source}" if world_source else "") + "); lower "
                "--micro_batch_size/--grad_accum, use fewer ranks, or add data")
        self.epoch = 0
        self.offset = 0  # next unread position inside epoch `self.epoch`'s permutation
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def next_global_batch(self) -> list[int]:
        """The next ``G`` indices of the stream (all ranks' samples), advancing the position.

        A global batch never straddles an epoch boundary (it could then hold one block twice): when fewer than
        ``G`` indices are left in an epoch's permutation, they are dropped and the batch is the next epoch's first
        ``G`` (the tail differs every epoch, since each is reshuffled; PyTorch's ``drop_last`` per epoch)."""
        if self.n - self.offset < self.global_batch:
            self.epoch += 1
            self.offset = 0
        perm = self._perm_of(self.epoch)
        out = perm[self.offset : self.offset + self.global_batch].tolist()
        self.offset += self.global_batch
        if self.n - self.offset < self.global_batch:  # the rest of this epoch cannot fill a batch: next epoch
            self.epoch += 1
            self.offset = 0
        return out

    def rank_micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches (lists of ``B`` indices) of ``global_batch``."""
        B, W, r = self.micro, self.world, self.rank
        return [global_batch[(k * W + r) * B : (k * W + r + 1) * B] for k in range(self.accum)]

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches for the next optimizer step (advances the position)."""
        return self.rank_micro_batches(self.next_global_batch())

    @property
    def samples_seen(self) -> int:
        """Samples consumed from the stream so far, all ranks together (each epoch uses ``n - n % G`` of them)."""
        return self.epoch * (self.n - self.n % self.global_batch) + self.offset

    def state_dict(self) -> dict:
        """Position in the stream and what defines the stream (for the checkpoint)."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n_samples": self.n}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: when the checkpoint's stream (seed or split size) differs from this one, so the
                position would not mean the same samples.
        """
        if int(state["seed"]) != self.seed or int(state["n_samples"]) != self.n:
            raise ValueError(
                f"the checkpoint's data order was made with seed {state['seed']} over {state['n_samples']} blocks, "
                f"this run has seed {self.seed} over {self.n} blocks; resume with the same --seed and stage-01 data, "
                f"or start a new RUN")
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])


def eval_shard(n_samples: int, world_size: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's validation batches: indices ``rank, rank + W, ...``, padded with ``-1``.

    Every rank gets the same number of batches, ``ceil(ceil(n / W) / batch_size)``, so collective
    forwards (ZeRO-3 gathers parameters in each one) stay in step; a ``-1`` marks a padding slot whose
    loss must be weighted 0.  Over all ranks every index in ``range(n_samples)`` appears exactly once.
    """
    per_rank = -(-n_samples // world_size)
    mine = list(range(rank, n_samples, world_size))
    mine += [-1] * (per_rank - len(mine))
    n_batches = -(-per_rank // batch_size)
    mine += [-1] * (n_batches * batch_size - len(mine))
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
