"""transformers internals: lifting the DeepSpeed config that accelerate registers with transformers for a block;
gated on :data:`pipeline.compat.VERIFIED` ``transformers``."""

from __future__ import annotations

import contextlib

from pipeline.compat import gate


@contextlib.contextmanager
def without_hf_zero3():
    """Let ``transformers`` build plain (unpartitioned) models while the block runs.

    Accelerate's DeepSpeed plugin registers its DeepSpeed config with ``transformers`` (an
    ``HfDeepSpeedConfig``, held in ``transformers.integrations.deepspeed``).  With ZeRO-3 registered, every
    ``from_config``/``from_pretrained`` then builds its model inside ``deepspeed.zero.Init``, which partitions
    each parameter as it is made, a collective (a broadcast per parameter).  A model built on one rank only
    (the export's copy on rank 0) then waits forever for ranks that are elsewhere.  That was seen under
    ``accelerate launch`` with 2 processes and ZeRO-3, on an H200 and on CPU.  The ``deepspeed`` launcher
    registers no such config.  Inside this block the registration is lifted and then restored (restoring it sets
    the private ``_hf_deepspeed_config_weak_ref``).  Outside the verified transformers versions the registration
    stays (transformers' own behaviour) and one line says so."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    if not hasattr(hf_ds, "_hf_deepspeed_config_weak_ref") or not gate(
            "lifting transformers' ZeRO-3 registration", "transformers",
            "transformers' registered DeepSpeed config stays in force"):
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
