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
from typing import Optional, Tuple

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


def row_programs(M: int, C: int) -> int:
    """Programs the row kernels launch on ``M`` rows of ``C``: the length of the partial
    column sums each writes per slot (``[slots, row_programs(M, C), C]`` fp32 buffers)."""
    return triton.cdiv(M, _tiles(C, M)[0])


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# Both kernels are compiled without FMA contraction: ATen rounds each product of the residual
# branch before the add, which a fused multiply-add would not (and the norm then reads the same
# sum whichever kernel computed it).
def _fwd_call(M: int, C: int, stride_x: int, stride_branch: int, rows_per_sample: int, keep_scale: float,
              eps: float, flags: tuple) -> KernelCall:
    has_branch, has_gamma, has_keep, t_fp32, norm, has_weight, has_bias = flags
    block_m, block_n = _tiles(C, M)
    return KernelCall(_layer_norm_fwd, (triton.cdiv(M, block_m),),
                      (M, C, stride_x, stride_branch, C, rows_per_sample, keep_scale, eps),
                      dict(HAS_BRANCH=has_branch, HAS_GAMMA=has_gamma, HAS_KEEP=has_keep, T_FP32=t_fp32, NORM=norm,
                           HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n,
                           enable_fp_fusion=False))


def _bwd_call(M: int, C: int, stride_x: int, stride_dy: int, stride_branch: int, rows_per_sample: int,
              keep_scale: float, flags: tuple) -> KernelCall:
    norm, has_weight, has_residual, write_dx, has_branch, has_gamma, has_keep, t_fp32, branch_sum = flags
    block_m, block_n = _tiles(C, M)
    programs = triton.cdiv(M, block_m)
    gamma_slot = 2 if norm else 0  # the slots of Partial: dw, db (norm), the gamma grad, the branch grad
    return KernelCall(_layer_norm_bwd, (programs,),
                      (M, C, stride_x, stride_dy, stride_branch, programs, rows_per_sample, keep_scale),
                      dict(NORM=norm, HAS_WEIGHT=has_weight, HAS_RESIDUAL=has_residual, WRITE_DX=write_dx,
                           HAS_BRANCH=has_branch, HAS_GAMMA=has_gamma, HAS_KEEP=has_keep, T_FP32=t_fp32,
                           BRANCH_SUM=branch_sum, GAMMA_SLOT=gamma_slot, BRANCH_SLOT=gamma_slot + has_gamma,
                           BLOCK_M=block_m, BLOCK_N=block_n, enable_fp_fusion=False))


# The launches of each row geometry (forward, backward).
_CALLS = CallCache() if triton is not None else None


def layer_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                       out_dtype: torch.dtype) -> tuple:
    """The Triton forward without autograd: ``(out, rows, stats)``, ``out`` in ``x``'s shape and
    ``out_dtype``; ``rows`` (``x`` as ``[M, C]`` rows) and ``stats`` (fp32 means, then 1/std,
    ``[2M]``) are what :func:`layer_norm_backward` reads. ``weight`` / ``bias`` in the dtype the
    result should be computed from (fp32 under autocast)."""
    rows = _rows(x)
    M, C = rows.shape
    # Allocated in x's shape (contiguous rows of C), so no view of it is needed on return.
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    stats = torch.empty(2 * M, dtype=torch.float32, device=x.device)  # means, then 1/std (one allocation)
    flags = (False, False, False, False, True, weight is not None, bias is not None)
    call_args = (M, C, rows.stride(0), C, 1, 1.0, eps, flags)
    _CALLS.get(("fwd",) + call_args, lambda: _fwd_call(*call_args))(
        rows, rows, rows, rows, weight if weight is not None else rows, bias if bias is not None else rows,
        out, out, stats)
    return out, rows, stats


def scaled_dtype(branch_dtype: torch.dtype, gamma_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype T of ``branch * gamma`` (ATen's promotion; the branch's without ``gamma``), in which
    timm's drop path draws and rounds its products."""
    return branch_dtype if gamma_dtype is None else torch.promote_types(branch_dtype, gamma_dtype)


def residual_forward(x: torch.Tensor, branch: torch.Tensor, gamma: Optional[torch.Tensor],
                     keep: Optional[torch.Tensor], keep_scale: float,
                     norm: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float, torch.dtype]] = None
                     ) -> tuple:
    """``s = x + drop_path(branch * gamma)`` in one kernel, with each product rounded to its dtype
    as ATen rounds timm's ``LayerScale`` / ``DropPath`` ops (``branch * gamma`` in their promoted
    dtype T, the kept samples' ``keep * keep_scale`` and the product in T, the sum in the promotion
    of x's dtype and T); with ``norm = (weight, bias, eps, out_dtype)`` also the LayerNorm of ``s``
    over the last axis (:func:`layer_norm_forward` of ``s``) in the same kernel.

    Args:
        x, branch: ``[B, ..., C]``.
        gamma: ``[C]`` or ``None``.
        keep: ``None`` or ``[B, 1, ...]`` 0/1 draws in T (timm's ``bernoulli_`` of the keep
            probability), the samples whose branch is kept, scaled by ``keep_scale``.

    Returns: ``(s, out, rows, stats)``: ``s`` in ``x``'s shape, and with ``norm`` the normalised
    ``s`` and what :func:`layer_norm_backward` reads (``rows`` is ``s`` as rows), else ``None``s.
    """
    t_dtype = scaled_dtype(branch.dtype, None if gamma is None else gamma.dtype)
    if keep is not None and (keep.dtype != t_dtype or keep.numel() != x.shape[0]):
        raise ValueError(f"keep must hold {x.shape[0]} draws in {t_dtype}, got {keep.numel()} in {keep.dtype}")
    if branch.shape != x.shape:
        raise ValueError(f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
    rows, branch_rows = _rows(x), _rows(branch)
    M, C = rows.shape
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, t_dtype), device=x.device)
    out = stats = None
    weight = bias = None
    eps = 0.0
    if norm is not None:
        weight, bias, eps, out_dtype = norm
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        stats = torch.empty(2 * M, dtype=torch.float32, device=x.device)
    flags = (True, gamma is not None, keep is not None, t_dtype == torch.float32, norm is not None,
             weight is not None, bias is not None)
    call_args = (M, C, rows.stride(0), branch_rows.stride(0), max(1, M // x.shape[0]), float(keep_scale), eps, flags)
    _CALLS.get(("fwd",) + call_args, lambda: _fwd_call(*call_args))(
        rows, branch_rows, gamma if gamma is not None else rows, keep if keep is not None else rows,
        weight if weight is not None else rows, bias if bias is not None else rows, s,
        out if out is not None else s, stats if stats is not None else s)
    return s, out, (s.view(M, C) if norm is not None else None), stats


def layer_norm_backward(grad_out: torch.Tensor, rows: torch.Tensor, weight: Optional[torch.Tensor],
                        stats: torch.Tensor, x_shape: torch.Size, bias_dtype: Optional[torch.dtype],
                        weight_grad: bool = True, bias_grad: bool = True,
                        grad_residual: Optional[torch.Tensor] = None, partial: Optional[torch.Tensor] = None
                        ) -> tuple:
    """The Triton backward without autograd: ``(dx, dweight, dbias)`` from :func:`layer_norm_forward`'s
    ``rows`` and ``stats``; ``dx`` in ``x_shape`` and the rows' dtype. ``grad_residual`` (``x_shape``,
    contiguous), when given, is added to ``dx`` in the kernel: the gradient ``x`` also receives
    through a residual connection. ``dweight`` / ``dbias`` are ``None`` without a weight / bias or
    when not asked for; with ``partial`` (``[2, row_programs(M, C), C]`` fp32) the kernel's partial
    column sums of them go there instead (summed by the caller) and both are ``None``."""
    M, C = rows.shape
    own_partial = partial is None
    if own_partial:
        partial = torch.empty(2, row_programs(M, C), C, dtype=torch.float32, device=rows.device)
    dx, _ = _backward(x_shape, (grad_out, rows, weight, stats), grad_residual, None, partial)
    dw = db = None
    if own_partial and (weight_grad or bias_grad):
        dw_sum, db_sum = partial.sum(1).unbind(0)
        dw = _cast(dw_sum, weight.dtype) if weight is not None and weight_grad else None
        db = _cast(db_sum, bias_dtype) if bias_dtype is not None and bias_grad else None
    return dx, dw, db


def residual_backward(grad_s: torch.Tensor, branch_dtype: torch.dtype, branch: Optional[torch.Tensor],
                      gamma: Optional[torch.Tensor], keep: Optional[torch.Tensor], keep_scale: float,
                      partial: Optional[torch.Tensor], branch_sum: bool = False,
                      norm: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = None
                      ) -> tuple:
    """The gradients of :func:`residual_forward`, ``(grad_x, grad_branch)``, in one kernel.

    ``grad_s`` is the gradient ``s`` gets from its other uses (contiguous, ``s``'s shape). With
    ``norm = (grad_out, rows, weight, stats)`` (those of its LayerNorm) the LayerNorm's backward of
    ``grad_out`` is added to it: ``grad_x`` is that sum (``s``'s gradient, which ``x`` receives
    unchanged), in the rows' dtype; without, ``grad_x`` is ``grad_s``. ``grad_branch`` is in
    ``branch_dtype``; ``branch`` (the forward's, read for ``gamma``'s gradient) may be ``None``
    without ``gamma``.

    ``partial`` (``[slots, row_programs(M, C), C]`` fp32; ``None`` when there are no slots) takes
    the kernel's partial column sums, in this order: the LayerNorm's weight and bias gradients
    (with ``norm``), ``gamma``'s gradient (with ``gamma``, before its cast to T and then
    ``gamma``'s dtype, see :func:`residual_forward`), and ``grad_branch`` (with ``branch_sum``:
    the gradient of a bias added last in the branch).
    """
    if gamma is not None and branch is None:
        raise ValueError("residual_backward needs the forward's branch for gamma's gradient")
    if not grad_s.is_contiguous():
        grad_s = grad_s.contiguous()
    t_dtype = scaled_dtype(branch_dtype, None if gamma is None else gamma.dtype)
    term = (branch_dtype, t_dtype, branch, gamma, keep, float(keep_scale), branch_sum)
    dx, dbranch = _backward(grad_s.shape, norm, grad_s, term, partial)
    return (grad_s if norm is None else dx), dbranch


def _backward(x_shape: torch.Size, norm: Optional[tuple], grad_residual: Optional[torch.Tensor],
              term: Optional[tuple], partial: Optional[torch.Tensor]) -> tuple:
    """One launch of the backward kernel: ``(dx, dbranch)`` (``None`` where not computed).
    ``norm``: ``(grad_out, rows, weight, stats)`` or ``None``; ``term``: the residual branch's
    ``(branch_dtype, t_dtype, branch, gamma, keep, keep_scale, branch_sum)`` or ``None``."""
    if norm is not None:
        grad_out, rows, weight, stats = norm
        M, C = rows.shape
        if grad_out.is_contiguous():  # rows of C, as the kernel reads them: used as it is
            dy, dy_stride = grad_out, C
        else:
            dy = _rows(grad_out.reshape(M, C))
            dy_stride = dy.stride(0)
        x_stride, device = rows.stride(0), rows.device
    else:
        C = grad_residual.shape[-1]
        M = grad_residual.numel() // C
        dy = rows = weight = stats = None
        dy_stride, x_stride, device = C, C, grad_residual.device
    has_residual = grad_residual is not None
    if has_residual and (grad_residual.shape != x_shape or not grad_residual.is_contiguous()):
        raise ValueError(f"grad_residual must be a contiguous {tuple(x_shape)} tensor, "
                         f"got {tuple(grad_residual.shape)} with strides {grad_residual.stride()}")
    dx = torch.empty(x_shape, dtype=rows.dtype, device=device) if norm is not None else None
    dbranch = branch_rows = None
    branch_stride, rows_per_sample, keep_scale = C, 1, 1.0
    flags_term = (False, False, False, False, False)
    if term is not None:
        branch_dtype, t_dtype, branch, gamma, keep, keep_scale, branch_sum = term
        dbranch = torch.empty(x_shape, dtype=branch_dtype, device=device)
        if branch is not None:
            branch_rows = _rows(branch)
            branch_stride = branch_rows.stride(0)
        rows_per_sample = max(1, M // x_shape[0])
        flags_term = (True, gamma is not None, keep is not None, t_dtype == torch.float32, branch_sum)
    slots = 2 * (norm is not None) + flags_term[1] + flags_term[4]
    if slots and (partial is None or partial.shape != (slots, row_programs(M, C), C) or not partial.is_contiguous()
                  or partial.dtype != torch.float32):
        raise ValueError(f"partial must be a contiguous fp32 {(slots, row_programs(M, C), C)} tensor, got "
                         f"{None if partial is None else (tuple(partial.shape), partial.dtype)}")
    flags = (norm is not None, weight is not None, has_residual, norm is not None) + flags_term
    call_args = (M, C, x_stride, dy_stride, branch_stride, rows_per_sample, keep_scale, flags)
    call = _CALLS.get(("bwd",) + call_args, lambda: _bwd_call(*call_args))
    any_tensor = grad_residual if grad_residual is not None else dy
    call(rows if rows is not None else any_tensor, dy if dy is not None else any_tensor,
         weight if weight is not None else any_tensor, stats if stats is not None else any_tensor,
         grad_residual if has_residual else any_tensor,
         branch_rows if branch_rows is not None else any_tensor,
         term[3] if term is not None and term[3] is not None else any_tensor,
         term[4] if term is not None and term[4] is not None else any_tensor,
         dx if dx is not None else any_tensor, dbranch if dbranch is not None else any_tensor,
         partial if slots else any_tensor)
    return dx, dbranch
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
    def _layer_norm_fwd(X, Branch, Gamma, Keep, W, B, S, Y, Stats, M, N, stride_x, stride_branch, stride_y,
                        rows_per_sample, keep_scale, eps,
                        HAS_BRANCH: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
                        T_FP32: tl.constexpr, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # HAS_BRANCH: x = x + drop_path(branch * gamma), written to S, each product rounded to T
        # (fp32 or the branch's dtype) as ATen rounds it; NORM: x's LayerNorm to Y and Stats.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH:
            T = tl.float32 if T_FP32 else Branch.dtype.element_ty
            t = tl.load(Branch + r64 * stride_branch + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_GAMMA:
                gamma = tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)
                t = (t * gamma[None, :]).to(T).to(tl.float32)
            if HAS_KEEP:
                keep = tl.load(Keep + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)
                keep = (keep * keep_scale).to(T).to(tl.float32)
                t = (t * keep[:, None]).to(T).to(tl.float32)
            x = (x + t).to(S.dtype.element_ty)
            tl.store(S + r64 * N + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
        if NORM:
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
            tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd(X, DY, W, Stats, DRes, Branch, Gamma, Keep, DX, DBranch, Partial, M, N, stride_x, stride_dy,
                        stride_branch, programs, rows_per_sample, keep_scale,
                        NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        WRITE_DX: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_GAMMA: tl.constexpr,
                        HAS_KEEP: tl.constexpr, T_FP32: tl.constexpr, BRANCH_SUM: tl.constexpr,
                        GAMMA_SLOT: tl.constexpr, BRANCH_SLOT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        # NORM: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w, the program's
        # rows' sums of dy * xhat (weight grad) and dy (bias grad) to slots 0 and 1 of Partial;
        # HAS_RESIDUAL: + DRes (rows of N). HAS_BRANCH: from dx (rounded to DX's dtype, which is
        # DRes without NORM) the gradient of the residual branch of _layer_norm_fwd to DBranch,
        # the products rounded as ATen's backward of timm's ops rounds them, gamma's gradient's
        # and (BRANCH_SUM) DBranch's column sums to their slots.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        dx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if NORM:
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
            tl.store(Partial + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)
            tl.store(Partial + (programs + pid) * N + cols, tl.sum(dy, axis=0), mask=col_ok)
        if HAS_RESIDUAL:
            dx += tl.load(DRes + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dx.to(DX.dtype.element_ty)
        if WRITE_DX:
            tl.store(DX + r64 * N + cols[None, :], dx, mask=mask)
        if HAS_BRANCH:
            T = tl.float32 if T_FP32 else DBranch.dtype.element_ty
            g = dx.to(T).to(tl.float32)
            if HAS_KEEP:
                keep = tl.load(Keep + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)
                keep = (keep * keep_scale).to(T).to(tl.float32)
                g = (g * keep[:, None]).to(T).to(tl.float32)
            if HAS_GAMMA:
                t = tl.load(Branch + r64 * stride_branch + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                d_gamma = tl.where(mask, (g * t).to(T).to(tl.float32), 0.0)
                tl.store(Partial + (GAMMA_SLOT * programs + pid) * N + cols, tl.sum(d_gamma, axis=0), mask=col_ok)
                g = (g * tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(T)
            g = g.to(DBranch.dtype.element_ty)
            tl.store(DBranch + r64 * N + cols[None, :], g, mask=mask)
            if BRANCH_SUM:
                g_sum = tl.sum(tl.where(mask, g.to(tl.float32), 0.0), axis=0)
                tl.store(Partial + (BRANCH_SLOT * programs + pid) * N + cols, g_sum, mask=col_ok)
