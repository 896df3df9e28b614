"""Layer normalisation over the last axis, with Triton forward and backward kernels on CUDA.

PyTorch's CUDA LayerNorm gives each row its own thread block; with the narrow rows of the
channels-last SR and NAT trunks (C = 60..192, ~10^5 rows) it reaches a fraction of the memory
bandwidth (HAT-S at 256x256: 86 LayerNorms, 10 ms of a 76 ms forward on an H200). The Triton
kernels normalise a tile of rows per program: the forward keeps each row's mean and 1/std, the
backward recomputes the normalised rows from them, writes dx and per-program partial sums of the
weight and bias gradients (summed by one reduction after). Calls under ``torch.compile``
(inductor fuses LayerNorm itself) and CPU tensors use ``F.layer_norm``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import autocast_dtype

try:
    import triton
    import triton.language as tl

    from ._triton_common import CallCache, KernelCall, interpreting
except ImportError:  # triton ships with torch's Linux builds only
    triton = None

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_MAX_WIDTH = 8192
_TILE_ELEMENTS = 4096  # rows per program = this / the padded row width


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               backend: str = "auto", autocast_output: bool = False) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last axis of ``x`` ``[..., C]``.

    Args:
        backend: ``"torch"`` (``F.layer_norm``), ``"triton"`` (the fused kernels, forward and
            backward; on CPU only under ``TRITON_INTERPRET=1``) or ``"auto"``: Triton for CUDA
            tensors of fp16 / bf16 / fp32 with ``C <= 8192`` outside ``torch.compile``,
            ``F.layer_norm`` otherwise. The environment variable ``VISATTN_LAYER_NORM=torch``
            makes ``"auto"`` always pick ``F.layer_norm`` (for A/B timing of whole models).
        autocast_output: under autocast, return the autocast dtype (e.g. bf16) instead of fp32,
            rounded from the same fp32 result: for outputs that only feed ops autocast casts to
            that dtype anyway (Linear, Conv), which then see the same values, without the fp32
            tensor and its cast (forward and backward). No effect outside autocast.

    Returns: ``[..., C]`` in ``x.dtype`` (under autocast fp32, as ``F.layer_norm``, or the
    autocast dtype with ``autocast_output``); differentiable in ``x``, ``weight`` and ``bias``.
    """
    C = x.shape[-1]
    if backend == "auto":
        use_triton = (x.is_cuda and triton_supports(x, C) and os.environ.get("VISATTN_LAYER_NORM") != "torch"
                      and not torch.compiler.is_compiling())
        backend = "triton" if use_triton else "torch"
    if backend == "torch":
        out = F.layer_norm(x, (C,), weight, bias, eps)
        compute_dtype = autocast_dtype(x.device.type)
        return out.to(compute_dtype) if autocast_output and compute_dtype is not None else out
    if backend != "triton":
        raise ValueError(f"unknown layer_norm backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if triton is None:
        raise RuntimeError("layer_norm backend 'triton' needs the triton package")
    if x.dtype not in _SUPPORTED or C > _MAX_WIDTH:
        raise ValueError(f"layer_norm backend 'triton' takes fp16 / bf16 / fp32 rows of at most {_MAX_WIDTH}, "
                         f"got {x.dtype} rows of {C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    compute_dtype = autocast_dtype(x.device.type)
    if compute_dtype is not None:
        # layer_norm is on autocast's fp32 list: the output is fp32, computed from the inputs cast
        # up. The kernels read x in its own dtype and compute in fp32 (the same numbers), so no fp32
        # copy of x is made, and its gradient is rounded to x's dtype once, as the cast's would be.
        out_dtype = compute_dtype if autocast_output else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            return _LayerNormFunction.apply(x, _float_or_none(weight), _float_or_none(bias), eps, out_dtype)
    return _LayerNormFunction.apply(x, weight, bias, eps, x.dtype)


def triton_supports(x: torch.Tensor, width: int) -> bool:
    """Whether the Triton kernels can normalise rows of ``width`` of ``x``: fp16 / bf16 / fp32 rows
    of at most 8192 on CUDA, or fp16 / fp32 ones on the CPU under ``TRITON_INTERPRET=1``."""
    if triton is None or x.dtype not in _SUPPORTED or width > _MAX_WIDTH:
        return False
    return x.is_cuda or (interpreting() and x.dtype != torch.bfloat16)


def _float_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skips the dispatch of a no-op .to(): host time is what these calls are short of.
    return t if t.dtype == dtype else t.to(dtype)


def _tiles(C: int, M: int) -> tuple:
    block_n = triton.next_power_of_2(C)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(max(1, M))))
    return block_m, block_n


def _fwd_call(M: int, C: int, stride_x: int, stride_y: int, eps: float, has_weight: bool,
              has_bias: bool) -> KernelCall:
    block_m, block_n = _tiles(C, M)
    return KernelCall(_layer_norm_fwd, (triton.cdiv(M, block_m),), (M, C, stride_x, stride_y, eps),
                      dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n))


def _bwd_call(M: int, C: int, stride_x: int, stride_dy: int, stride_dx: int, has_weight: bool,
              has_residual: bool) -> KernelCall:
    block_m, block_n = _tiles(C, M)
    programs = triton.cdiv(M, block_m)
    return KernelCall(_layer_norm_bwd, (programs,), (M, C, stride_x, stride_dy, stride_dx, programs),
                      dict(HAS_WEIGHT=has_weight, HAS_RESIDUAL=has_residual, BLOCK_M=block_m, BLOCK_N=block_n))


# The launches of each row geometry (forward, backward).
_CALLS = CallCache() if triton is not None else None


def layer_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                       out_dtype: torch.dtype) -> tuple:
    """The Triton forward without autograd: ``(out, rows, stats)``, ``out`` in ``x``'s shape and
    ``out_dtype``; ``rows`` (``x`` as ``[M, C]`` rows) and ``stats`` (fp32 means, then 1/std,
    ``[2M]``) are what :func:`layer_norm_backward` reads. ``weight`` / ``bias`` in the dtype the
    result should be computed from (fp32 under autocast)."""
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    # Allocated in x's shape (contiguous rows of C), so no view of it is needed on return.
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    stats = torch.empty(2 * M, dtype=torch.float32, device=x.device)  # means, then 1/std (one allocation)
    call_args = (M, C, rows.stride(0), C, eps, weight is not None, bias is not None)
    _CALLS.get(("fwd",) + call_args, lambda: _fwd_call(*call_args))(
        rows, weight if weight is not None else rows, bias if bias is not None else rows, out, stats)
    return out, rows, stats


def layer_norm_backward(grad_out: torch.Tensor, rows: torch.Tensor, weight: Optional[torch.Tensor],
                        stats: torch.Tensor, x_shape: torch.Size, bias_dtype: Optional[torch.dtype],
                        weight_grad: bool = True, bias_grad: bool = True,
                        grad_residual: Optional[torch.Tensor] = None) -> tuple:
    """The Triton backward without autograd: ``(dx, dweight, dbias)`` from :func:`layer_norm_forward`'s
    ``rows`` and ``stats``; ``dx`` in ``x_shape`` and the rows' dtype. ``grad_residual`` (``x_shape``,
    contiguous), when given, is added to ``dx`` in the kernel: the gradient ``x`` also receives
    through a residual connection. ``dweight`` / ``dbias`` are ``None`` without a weight / bias or
    when not asked for."""
    M, C = rows.shape
    if grad_out.is_contiguous():  # rows of C, as the kernel reads them: used as it is
        dy, dy_stride = grad_out, C
    else:
        dy = grad_out.reshape(M, C)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dy_stride = dy.stride(0)
    has_residual = grad_residual is not None
    if has_residual and (grad_residual.shape != x_shape or not grad_residual.is_contiguous()):
        raise ValueError(f"grad_residual must be a contiguous {tuple(x_shape)} tensor, "
                         f"got {tuple(grad_residual.shape)} with strides {grad_residual.stride()}")
    dx = torch.empty(x_shape, dtype=rows.dtype, device=rows.device)
    call_args = (M, C, rows.stride(0), dy_stride, C, weight is not None, has_residual)
    call = _CALLS.get(("bwd",) + call_args, lambda: _bwd_call(*call_args))
    partial = torch.empty(2, call.grid[0], C, dtype=torch.float32, device=rows.device)  # dw, db per program
    call(rows, dy, weight if weight is not None else rows, stats, grad_residual if has_residual else dx, dx, partial)
    dw = db = None
    if weight_grad or bias_grad:
        dw_sum, db_sum = partial.sum(1).unbind(0)
        dw = _cast(dw_sum, weight.dtype) if weight is not None and weight_grad else None
        db = _cast(db_sum, bias_dtype) if bias_dtype is not None and bias_grad else None
    return dx, dw, db


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        out, rows, stats = layer_norm_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(rows, weight, stats)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, stats = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(grad_out, rows, weight, stats, ctx.x_shape, ctx.bias_dtype,
                                         ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return dx, dw, db, None, None


if triton is not None:

    @triton.jit
    def _layer_norm_fwd(X, W, B, Y, Stats, M, N, stride_x, stride_y, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        tl.store(Stats + rows, mean, mask=row_ok)
        tl.store(Stats + M + rows, rstd, mask=row_ok)
        y = centred * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd(X, DY, W, Stats, DRes, DX, Partial, M, N, stride_x, stride_dy, stride_dx, programs,
                        HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (+ DRes, rows of N, with
        # HAS_RESIDUAL); the program's rows' sums of dy * xhat (weight grad) and dy (bias grad) go
        # to its slot of Partial.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Stats + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Stats + M + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gx = tl.sum(g * xhat, axis=1) / N
        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        if HAS_RESIDUAL:
            dx += tl.load(DRes + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(Partial + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)
        tl.store(Partial + (programs + pid) * N + cols, tl.sum(dy, axis=0), mask=col_ok)
