"""Reading stage-01 token shards: the contract between the data stage and every training stage.

``results/<run>/01_data/`` holds ``tokenizer/`` (a ``transformers`` fast tokenizer), and per split
one or more shards ``<split>-00000.bin``: flat memory-mapped arrays of token ids (``uint16`` when the
vocabulary fits, else ``uint32``), documents joined with the EOS token.  The manifest's ``outputs``
list the shards and their dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_tokens(data_dir: str | Path, split: str, manifest: dict | None = None) -> np.ndarray:
    """All token ids of ``split`` (``"train"`` or ``"val"``) as one 1-D array.

    A single shard is returned as a read-only ``np.memmap`` (nothing is read until used); several
    shards are concatenated in memory.

    Raises:
        FileNotFoundError: when the split has no shard.
    """
    from pipeline.manifest import read_manifest

    data_dir = Path(data_dir)
    manifest = manifest or read_manifest(data_dir)
    out = manifest["outputs"]
    dtype = np.dtype(out["dtype"])
    shards = [data_dir / s for s in out[f"{split}_shards"]]
    if not shards:
        raise FileNotFoundError(f"{data_dir}: no {split} shards listed in the manifest")
    arrays = [np.memmap(s, dtype=dtype, mode="r") for s in shards]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``seq_len + 1`` tokens (inputs and shifted labels) from a token array.

    Block ``i`` is ``tokens[i*seq_len : (i+1)*seq_len + 1]``; consecutive blocks share one token, so
    every token but the first is predicted exactly once per epoch.  ``len`` is
    ``(len(tokens) - 1) // seq_len``.  Items are ``int64`` tensors of shape ``(seq_len + 1,)``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64))
