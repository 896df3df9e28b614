"""Layer normalisation over the last axis, with a Triton forward for inference on CUDA.

PyTorch's CUDA LayerNorm gives each row its own thread block; with the narrow rows of the
channels-last SR and NAT trunks (C = 60..192, ~10^5 rows) it reaches a fraction of the memory
bandwidth (HAT-S at 256x256: 86 LayerNorms, 10 ms of a 76 ms forward on an H200). The Triton
kernel normalises a tile of rows per program. It has no backward: calls that need gradients,
calls under ``torch.compile`` (inductor fuses LayerNorm itself) and CPU tensors use
``F.layer_norm``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch's Linux builds only
    triton = None

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MAX_WIDTH = 8192
_TILE_ELEMENTS = 4096  # rows per program = this / the padded row width


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    # Autocast runs layer_norm in fp32 (its fp32 cast policy); follow it so both paths agree.
    if torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               backend: str = "auto") -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last axis of ``x`` ``[..., C]``.

    Args:
        backend: ``"torch"`` (``F.layer_norm``), ``"triton"`` (the forward kernel; on CPU only under
            ``TRITON_INTERPRET=1``; no gradients) or ``"auto"``: Triton for CUDA tensors when no
            gradient is needed, the dtype is fp16 / bf16 / fp32 and ``C <= 8192``, outside
            ``torch.compile``; ``F.layer_norm`` otherwise.

    Returns: ``[..., C]`` in ``x.dtype`` (fp32 under autocast, as ``F.layer_norm``).
    """
    C = x.shape[-1]
    if backend == "auto":
        use_triton = (triton is not None and x.is_cuda and x.dtype in _SUPPORTED and C <= _MAX_WIDTH
                      and not _needs_grad(x, weight, bias) and not torch.compiler.is_compiling())
        backend = "triton" if use_triton else "torch"
    if backend == "torch":
        return F.layer_norm(x, (C,), weight, bias, eps)
    if backend != "triton":
        raise ValueError(f"unknown layer_norm backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if triton is None:
        raise RuntimeError("layer_norm backend 'triton' needs the triton package")
    if _needs_grad(x, weight, bias):
        raise ValueError("layer_norm backend 'triton' has no backward: use 'auto' or 'torch' when gradients are needed")
    if x.dtype not in _SUPPORTED or C > _MAX_WIDTH:
        raise ValueError(f"layer_norm backend 'triton' takes fp16 / bf16 / fp32 rows of at most {_MAX_WIDTH}, "
                         f"got {x.dtype} rows of {C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    rows = x.reshape(-1, C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=_output_dtype(x), device=x.device)
    block_n = triton.next_power_of_2(C)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(max(1, rows.shape[0]))))
    grid = (triton.cdiv(rows.shape[0], block_m),)
    _layer_norm_fwd[grid](
        rows, weight if weight is not None else rows, bias if bias is not None else rows, out,
        rows.shape[0], C, rows.stride(0), out.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out.view(x.shape)


if triton is not None:

    @triton.jit
    def _layer_norm_fwd(X, W, B, Y, M, N, stride_x, stride_y, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        y = centred * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
