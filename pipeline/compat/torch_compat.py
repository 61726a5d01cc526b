"""PyTorch internals: the eager forward of a compiled module, and cuSPARSELt's private tuning knobs; gated on
:data:`pipeline.compat.VERIFIED` ``torch``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipeline.compat import gate


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX tiles), as PyTorch detects it.

    On CPUs without either (AVX2-only, many AVX-512 parts) PyTorch emulates bf16 GEMMs, several times slower than
    fp32 (``results/bench/NOTES.md``, "2026-12-03, CPU: bf16 is emulated").
    Reads PyTorch's private ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` (present in
    2.4-2.13); where neither exists, or on a PyTorch outside :data:`pipeline.compat.VERIFIED` (one line says so),
    returns ``True`` (the behaviour before this check: bf16).
    """
    if not gate("CPU bf16 detection", "torch", "bf16 is assumed native on this CPU"):
        return True
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    if not probes:
        return True
    return any(bool(p()) for p in probes)


def is_persistent_buffer(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s own buffer ``name`` is saved in its ``state_dict`` (not ``persistent=False``).

    Reads the private ``_non_persistent_buffers_set``; outside the verified PyTorch versions the answer comes from
    ``module.state_dict(keep_vars=True)`` instead (slower: it walks the submodules) and one line says so."""
    if hasattr(module, "_non_persistent_buffers_set") and gate(
            "non-persistent buffer lookup", "torch", "buffers are looked up in state_dict()"):
        return name not in module._non_persistent_buffers_set
    return name in module.state_dict(keep_vars=True)


def set_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs`` now (its private ``_last_lr``), before its next ``step()``.

    Outside the verified PyTorch versions nothing is set (``get_last_lr()`` shows the new values from the next
    step on; the optimizer's param groups, which the step uses, are already set) and one line says so."""
    if hasattr(scheduler, "_last_lr") and gate("LR scheduler's last LR", "torch",
                                               "get_last_lr() shows the new peak LR from the next step on"):
        scheduler._last_lr = list(lrs)


@contextlib.contextmanager
def eager_forward(module: torch.nn.Module):
    """Run the block with ``module``'s eager forward although ``module.compile()`` was called.

    ``nn.Module.compile`` keeps the compiled callable in the private ``_compiled_call_impl``; it is set aside for
    the block and put back afterwards.  Outside the verified PyTorch versions the compiled forward runs (the same
    numbers, but each new shape is compiled) and one line says so."""
    if not hasattr(module, "_compiled_call_impl") or not gate(
            "eager forward of a compiled model", "torch", "the compiled forward runs (recompiling new shapes)"):
        yield
        return
    saved = module._compiled_call_impl
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = saved


def _same_product(ws: torch.Tensor, weight: torch.Tensor, tokens: int = 64) -> bool:
    """True when ``F.linear`` with the sparse weight ``ws`` gives the shape and (to fp16 rounding) the values of
    the dense ``weight`` on a random input; False on any error."""
    try:
        x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype,
                        generator=torch.Generator(device=weight.device).manual_seed(0))
        ref = torch.nn.functional.linear(x, weight).float()
        out = torch.nn.functional.linear(x, ws)
        return out.shape == ref.shape and bool(torch.allclose(out.float(), ref, rtol=2e-2,
                                                             atol=2e-2 * float(ref.abs().max()) + 1e-3))
    except Exception:  # noqa: BLE001 - any failure means: do not use this layout
        return False


def semi_structured_weight(weight: torch.Tensor, fuse_transpose: bool, alg_search_tokens: int):
    """``to_sparse_semi_structured(weight)``; with ``fuse_transpose`` cuSPARSELt writes the product in the
    layout ``F.linear``'s caller expects (``fuse_transpose_cusparselt``, an attribute of PyTorch's cuSPARSELt
    tensor since 2.1; PyTorch >= 2.12 fuses it in ``F.linear`` anyway); with ``alg_search_tokens`` the
    cuSPARSELt algorithm is the fastest of ``torch._cslt_sparse_mm_search`` for that many tokens.  Both set
    private attributes of PyTorch's cuSPARSELt tensor: on a PyTorch outside :data:`pipeline.compat.VERIFIED` the
    plain ``to_sparse_semi_structured(weight)`` is returned and one line says so."""
    from torch.sparse import to_sparse_semi_structured

    ws = to_sparse_semi_structured(weight)
    if (fuse_transpose or alg_search_tokens) and not gate(
            "cuSPARSELt fused transpose / algorithm search", "torch", "PyTorch's default cuSPARSELt layout is used"):
        return ws
    if fuse_transpose and hasattr(ws, "fuse_transpose_cusparselt"):
        ws.fuse_transpose_cusparselt = True
        if not _same_product(ws, weight):  # this PyTorch does not honour the flag as expected: leave it off
            ws = to_sparse_semi_structured(weight)
    if alg_search_tokens and hasattr(ws, "alg_id_cusparselt") and getattr(ws, "packed", None) is not None:
        try:  # the search's signature and result have changed between PyTorch versions: any failure keeps alg 0
            x = torch.randn(weight.shape[1], alg_search_tokens, device=weight.device, dtype=weight.dtype)
            found = torch._cslt_sparse_mm_search(ws.packed, x, transpose_result=bool(ws.fuse_transpose_cusparselt))
            ws.alg_id_cusparselt = int(found[0] if isinstance(found, (tuple, list)) else found)
        except Exception as e:  # noqa: BLE001
            print(f"cuSPARSELt algorithm search failed, default algorithm kept: {type(e).__name__}: {e}"[:300],
                  flush=True)
    return ws
