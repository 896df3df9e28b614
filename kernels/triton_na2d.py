"""Fused Triton forward and backward of 2-D neighborhood attention (dilation, stride, rpb).

Each program owns a ``TILE_H x TILE_W`` tile of queries of one dilation sub-grid, for one
(batch, head). The tile's windows all lie inside a key *halo* of at most
``TILE + kernel + stride - 2`` sub-grid positions per axis; the program walks the halo one key row
at a time (``BLOCK_KW`` keys), computes the logits of the whole query tile against that row with
``tl.dot``, masks keys outside each query's own window, adds the rpb and folds the row into an
online softmax. Nothing of size ``N x k^2`` is written to memory; the forward keeps only the
log-sum-exp. The backward walks the same halo, recomputes the probabilities, accumulates dQ in
registers and adds dK, dV and the rpb gradient atomically (fp32).

Work in progress for issue 4 (no autotuning, no torch.compile registration yet), so
``backend="auto"`` does not pick it yet.
"""
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._checks import NAParams


@triton.jit
def _window_start(sub_pos, sub_len, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    # NATTEN semantics on one sub-grid axis: the window of the stride group's centre query,
    # shifted to stay inside [0, sub_len).
    leader = tl.minimum((sub_pos // STRIDE) * STRIDE + STRIDE // 2, sub_len - 1)
    return tl.minimum(tl.maximum(leader - KERNEL // 2, 0), sub_len - KERNEL)


@triton.jit
def _query_tile(
    H, W, HEADS,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """This program's (batch, head, dilation group), its query tile in sub-grid coordinates, each
    query's window start and the tile's key halo origin."""
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_g = tl.program_id(2)
    gh = pid_g // DW
    gw = pid_g % DW
    # Sub-grid of dilation group (gh, gw): positions gh, gh + DH, ...
    len_h = (H - gh + DH - 1) // DH
    len_w = (W - gw + DW - 1) // DW
    tiles_w = tl.cdiv(len_w, TILE_W)
    th = pid_tile // tiles_w
    tw = pid_tile % tiles_w
    TQ: tl.constexpr = TILE_H * TILE_W
    offs_q = tl.arange(0, TQ)
    qi = th * TILE_H + offs_q // TILE_W
    qj = tw * TILE_W + offs_q % TILE_W
    q_valid = (qi < len_h) & (qj < len_w)
    qi_c = tl.minimum(qi, len_h - 1)
    qj_c = tl.minimum(qj, len_w - 1)
    start_h = _window_start(qi_c, len_h, KH, SH)
    start_w = _window_start(qj_c, len_w, KW, SW)
    # Windows are monotone in the query position: the tile's first query opens the halo.
    halo_h = _window_start(th * TILE_H, len_h, KH, SH)
    halo_w = _window_start(tw * TILE_W, len_w, KW, SW)
    b = (pid_bh // HEADS).to(tl.int64)
    return b, pid_bh % HEADS, gh, gw, len_h, len_w, qi_c, qj_c, q_valid, start_h, start_w, halo_h, halo_w


@triton.jit
def _na2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr,
    s_qb, s_qh, s_qw, s_qn, s_qd,
    s_kb, s_kh, s_kw, s_kn, s_kd,
    s_vb, s_vh, s_vw, s_vn, s_vd,
    s_ob, s_oh, s_ow, s_on, s_od,
    s_rn, s_rh, s_rw,
    H, W, HEADS, HEAD_DIM, scale,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, HALO_H: tl.constexpr, BLOCK_KW: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr,
):
    b, n, gh, gw, len_h, len_w, qi_c, qj_c, q_valid, start_h, start_w, halo_h, halo_w = _query_tile(
        H, W, HEADS, KH, KW, DH, DW, SH, SW, TILE_H, TILE_W
    )
    TQ: tl.constexpr = TILE_H * TILE_W

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_rows = (qi_c * DH + gh).to(tl.int64)
    q_cols = (qj_c * DW + gw).to(tl.int64)
    q_off = b * s_qb + n * s_qn + q_rows * s_qh + q_cols * s_qw
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * s_qd, mask=q_valid[:, None] & d_valid[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)

    m_i = tl.full([TQ], -1.0e30, tl.float32)
    l_i = tl.zeros([TQ], tl.float32)
    acc = tl.zeros([TQ, BLOCK_D], tl.float32)
    offs_kw = tl.arange(0, BLOCK_KW)
    kx = halo_w + offs_kw
    kx_valid = kx < len_w
    k_cols = (tl.minimum(kx, len_w - 1) * DW + gw).to(tl.int64)
    for r in range(0, HALO_H):
        ky = halo_h + r
        ky_c = tl.minimum(ky, len_h - 1)
        k_row = (ky_c * DH + gh).to(tl.int64)
        kv_mask = kx_valid[:, None] & d_valid[None, :] & (ky < len_h)
        k_off = b * s_kb + n * s_kn + k_row * s_kh + k_cols * s_kw
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)  # [TQ, BLOCK_KW]
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
        in_window = (
            (ky >= start_h) & (ky < start_h + KH)
        )[:, None] & ((kx[None, :] >= start_w[:, None]) & (kx[None, :] < start_w[:, None] + KW)) & kx_valid[None, :]
        if HAS_RPB:
            rh = ky - qi_c + KH - 1
            rw = kx[None, :] - qj_c[:, None] + KW - 1
            bias = tl.load(rpb_ptr + n * s_rn + rh[:, None] * s_rh + rw * s_rw, mask=in_window, other=0.0)
            s = s + bias.to(tl.float32)
        s = tl.where(in_window, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        p = tl.where(in_window, p, 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = b * s_vb + n * s_vn + k_row * s_vh + k_cols * s_vw
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=tl.float32)
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    # Log-sum-exp per query, [B, heads, H, W] contiguous, for the backward.
    lse_off = (b * HEADS + n) * H * W + q_rows * W + q_cols
    tl.store(lse_ptr + lse_off, m_i + tl.log(l_i), mask=q_valid)
    o_off = b * s_ob + n * s_on + q_rows * s_oh + q_cols * s_ow
    tl.store(
        out_ptr + o_off[:, None] + offs_d[None, :] * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_valid[:, None] & d_valid[None, :],
    )


@triton.jit
def _na2d_bwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, drpb_ptr,
    s_qb, s_qh, s_qw, s_qn, s_qd,
    s_kb, s_kh, s_kw, s_kn, s_kd,
    s_vb, s_vh, s_vw, s_vn, s_vd,
    s_ob, s_oh, s_ow, s_on, s_od,
    s_gb, s_gh, s_gw, s_gn, s_gd,
    s_rn, s_rh, s_rw,
    H, W, HEADS, HEAD_DIM, scale,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, HALO_H: tl.constexpr, BLOCK_KW: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr,
):
    # Same tiling as the forward. Per halo row: recompute P from the saved log-sum-exp, then
    # dQ accumulates in registers while dK, dV (and the rpb gradient) are added atomically in fp32.
    b, n, gh, gw, len_h, len_w, qi_c, qj_c, q_valid, start_h, start_w, halo_h, halo_w = _query_tile(
        H, W, HEADS, KH, KW, DH, DW, SH, SW, TILE_H, TILE_W
    )
    TQ: tl.constexpr = TILE_H * TILE_W

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_mask = q_valid[:, None] & d_valid[None, :]
    q_rows = (qi_c * DH + gh).to(tl.int64)
    q_cols = (qj_c * DW + gw).to(tl.int64)
    q = tl.load(q_ptr + (b * s_qb + n * s_qn + q_rows * s_qh + q_cols * s_qw)[:, None] + offs_d[None, :] * s_qd,
                mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    do = tl.load(do_ptr + (b * s_ob + n * s_on + q_rows * s_oh + q_cols * s_ow)[:, None] + offs_d[None, :] * s_od,
                 mask=q_mask, other=0.0)
    stat_off = (b * HEADS + n) * H * W + q_rows * W + q_cols
    lse = tl.load(lse_ptr + stat_off, mask=q_valid, other=0.0)
    delta = tl.load(delta_ptr + stat_off, mask=q_valid, other=0.0)

    dq = tl.zeros([TQ, BLOCK_D], tl.float32)
    offs_kw = tl.arange(0, BLOCK_KW)
    kx = halo_w + offs_kw
    kx_valid = kx < len_w
    k_cols = (tl.minimum(kx, len_w - 1) * DW + gw).to(tl.int64)
    for r in range(0, HALO_H):
        ky = halo_h + r
        k_row = (tl.minimum(ky, len_h - 1) * DH + gh).to(tl.int64)
        kv_mask = kx_valid[:, None] & d_valid[None, :] & (ky < len_h)
        k = tl.load(k_ptr + (b * s_kb + n * s_kn + k_row * s_kh + k_cols * s_kw)[:, None] + offs_d[None, :] * s_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (b * s_vb + n * s_vn + k_row * s_vh + k_cols * s_vw)[:, None] + offs_d[None, :] * s_vd,
                    mask=kv_mask, other=0.0)
        in_window = (
            ((ky >= start_h) & (ky < start_h + KH))[:, None]
            & ((kx[None, :] >= start_w[:, None]) & (kx[None, :] < start_w[:, None] + KW))
            & kx_valid[None, :] & q_valid[:, None]
        )
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=tl.float32)
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
            dp = tl.dot(do, tl.trans(v), out_dtype=tl.float32)
        rh = ky - qi_c + KH - 1
        rw = kx[None, :] - qj_c[:, None] + KW - 1
        rpb_off = n * s_rn + rh[:, None] * s_rh + rw * s_rw
        if HAS_RPB:
            s = s + tl.load(rpb_ptr + rpb_off, mask=in_window, other=0.0).to(tl.float32)
        p = tl.where(in_window, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])  # gradient of the logits
        if HAS_RPB:
            tl.atomic_add(drpb_ptr + rpb_off, ds, mask=in_window)
        if IEEE:
            dv_tile = tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            dk_tile = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            dv_tile = tl.dot(tl.trans(p.to(do.dtype)), do, out_dtype=tl.float32)
            dk_tile = tl.dot(tl.trans(ds.to(q.dtype)), q, out_dtype=tl.float32)
            dq += tl.dot(ds.to(k.dtype), k, out_dtype=tl.float32)
        g_off = (b * s_gb + n * s_gn + k_row * s_gh + k_cols * s_gw)[:, None] + offs_d[None, :] * s_gd
        tl.atomic_add(dv_ptr + g_off, dv_tile, mask=kv_mask)
        tl.atomic_add(dk_ptr + g_off, dk_tile, mask=kv_mask)
    dq_off = (b * s_gb + n * s_gn + q_rows * s_gh + q_cols * s_gw)[:, None] + offs_d[None, :] * s_gd
    tl.store(dq_ptr + dq_off, dq * scale, mask=q_mask)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def _launch_config(q: torch.Tensor, params: NAParams) -> tuple:
    B, H, W, heads, D = q.shape
    (kh, kw), (dh, dw), (sh, sw) = params.kernel_size, params.dilation, params.stride
    tile_h, tile_w = 8, 8
    grid = (triton.cdiv(math.ceil(H / dh), tile_h) * triton.cdiv(math.ceil(W / dw), tile_w), B * heads, dh * dw)
    meta = dict(
        KH=kh, KW=kw, DH=dh, DW=dw, SH=sh, SW=sw, TILE_H=tile_h, TILE_W=tile_w,
        HALO_H=tile_h + kh + sh - 2, BLOCK_KW=_pow2_at_least(tile_w + kw + sw - 2),
        BLOCK_D=_pow2_at_least(D), IEEE=q.dtype == torch.float32,
    )
    return grid, meta


def na2d_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams, rpb: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on ``[B, H, W, heads, D]`` (any strides).

    Returns the output (contiguous, input dtype) and the fp32 log-sum-exp ``[B, heads, H, W]``.
    """
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"the triton na2d backend needs v's head_dim == q's, got {v.shape[-1]} and {q.shape[-1]}")
    B, H, W, heads, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)
    grid, meta = _launch_config(q, params)
    _na2d_fwd_kernel[grid](
        q, k, v, rpb if rpb is not None else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *(rpb.stride() if rpb is not None else (0, 0, 0)),
        H, W, heads, D, params.scale, HAS_RPB=rpb is not None, **meta,
    )
    return out, lse


def na2d_triton_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
    out: torch.Tensor, lse: torch.Tensor, params: NAParams,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused backward: ``(dq, dk, dv, drpb)`` in the inputs' dtypes (dk, dv, drpb accumulate in fp32)."""
    B, H, W, heads, D = q.shape
    rpb = rpb.contiguous() if rpb is not None else None  # shares its strides with the fp32 gradient
    delta = (grad_out.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()
    dq, dk, dv = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(3))
    drpb = torch.zeros(rpb.shape, dtype=torch.float32, device=q.device) if rpb is not None else None
    grid, meta = _launch_config(q, params)
    _na2d_bwd_kernel[grid](
        q, k, v, rpb if rpb is not None else q, grad_out, lse, delta, dq, dk, dv, drpb if drpb is not None else dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *(drpb.stride() if drpb is not None else (0, 0, 0)),
        H, W, heads, D, params.scale, HAS_RPB=rpb is not None, **meta,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (drpb.to(rpb.dtype) if rpb is not None else None)


class _NA2dTriton(torch.autograd.Function):
    """Fused forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, params):
        out, lse = na2d_triton_forward(q, k, v, params, rpb)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = na2d_triton_backward(grad_out, q, k, v, rpb, out, lse, ctx.params)
        return dq, dk, dv, drpb, None


def na_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams, rpb: Optional[torch.Tensor]
) -> torch.Tensor:
    """The ``"triton"`` backend: 2-D only for now."""
    if len(params.spatial) != 2:
        raise ValueError(f"the triton backend implements na2d only so far, got a {len(params.spatial)}-D call")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {q.device}")
    return _NA2dTriton.apply(q, k, v, rpb, params)
