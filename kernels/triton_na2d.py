"""Fused Triton forward of 2-D neighborhood attention (dilation, stride, rpb).

Each program owns a ``TILE_H x TILE_W`` tile of queries of one dilation sub-grid, for one
(batch, head). The tile's windows all lie inside a key *halo* of at most
``TILE + kernel + stride - 2`` sub-grid positions per axis; the program walks the halo one key row
at a time (``BLOCK_KW`` keys), computes the logits of the whole query tile against that row with
``tl.dot``, masks keys outside each query's own window, adds the rpb and folds the row into an
online softmax. Nothing of size ``N x k^2`` is written to memory.

Work in progress for issue 4: this is the forward only. Its autograd backward recomputes through
the reference backend, so ``backend="auto"`` does not pick it yet.
"""
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import NAParams
from .reference import na_reference


@triton.jit
def _window_start(sub_pos, sub_len, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    # NATTEN semantics on one sub-grid axis: the window of the stride group's centre query,
    # shifted to stay inside [0, sub_len).
    leader = tl.minimum((sub_pos // STRIDE) * STRIDE + STRIDE // 2, sub_len - 1)
    return tl.minimum(tl.maximum(leader - KERNEL // 2, 0), sub_len - KERNEL)


@triton.jit
def _na2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr,
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
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_g = tl.program_id(2)
    b = pid_bh // HEADS
    n = pid_bh % HEADS
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
    qi = th * TILE_H + offs_q // TILE_W  # sub-grid row of each query
    qj = tw * TILE_W + offs_q % TILE_W
    q_valid = (qi < len_h) & (qj < len_w)
    qi_c = tl.minimum(qi, len_h - 1)
    qj_c = tl.minimum(qj, len_w - 1)
    start_h = _window_start(qi_c, len_h, KH, SH)
    start_w = _window_start(qj_c, len_w, KW, SW)
    # Windows are monotone in the query position: the tile's first query opens the halo.
    halo_h = _window_start(th * TILE_H, len_h, KH, SH)
    halo_w = _window_start(tw * TILE_W, len_w, KW, SW)

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_rows = (qi_c * DH + gh).to(tl.int64)
    q_cols = (qj_c * DW + gw).to(tl.int64)
    q_off = b.to(tl.int64) * s_qb + n * s_qn + q_rows * s_qh + q_cols * s_qw
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
        k_off = b.to(tl.int64) * s_kb + n * s_kn + k_row * s_kh + k_cols * s_kw
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
        v_off = b.to(tl.int64) * s_vb + n * s_vn + k_row * s_vh + k_cols * s_vw
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=tl.float32)
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = b.to(tl.int64) * s_ob + n * s_on + q_rows * s_oh + q_cols * s_ow
    tl.store(
        out_ptr + o_off[:, None] + offs_d[None, :] * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_valid[:, None] & d_valid[None, :],
    )


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def na2d_triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams, rpb: Optional[torch.Tensor]
) -> torch.Tensor:
    """Fused forward on ``[B, H, W, heads, D]`` (any strides); returns a contiguous tensor of that shape."""
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"the triton na2d backend needs v's head_dim == q's, got {v.shape[-1]} and {q.shape[-1]}")
    B, H, W, heads, D = q.shape
    (kh, kw), (dh, dw), (sh, sw) = params.kernel_size, params.dilation, params.stride
    tile_h, tile_w = 8, 8
    halo_h = tile_h + kh + sh - 2
    block_kw = _pow2_at_least(tile_w + kw + sw - 2)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sub_h, sub_w = math.ceil(H / dh), math.ceil(W / dw)
    grid = (triton.cdiv(sub_h, tile_h) * triton.cdiv(sub_w, tile_w), B * heads, dh * dw)
    rpb_arg = rpb if rpb is not None else q
    rpb_strides = rpb.stride() if rpb is not None else (0, 0, 0)
    _na2d_fwd_kernel[grid](
        q, k, v, rpb_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *rpb_strides,
        H, W, heads, D, params.scale,
        KH=kh, KW=kw, DH=dh, DW=dw, SH=sh, SW=sw,
        TILE_H=tile_h, TILE_W=tile_w, HALO_H=halo_h, BLOCK_KW=block_kw,
        BLOCK_D=_pow2_at_least(D), HAS_RPB=rpb is not None, IEEE=q.dtype == torch.float32,
    )
    return out


class _NA2dTriton(torch.autograd.Function):
    """Fused forward; the backward recomputes through the reference backend (interim, issue 4)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, params):
        ctx.save_for_backward(q, k, v, rpb)
        ctx.params = params
        return na2d_triton_forward(q, k, v, params, rpb)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        rpb_in = rpb.detach().requires_grad_(rpb.requires_grad) if rpb is not None else None
        with torch.enable_grad():
            out = na_reference(*inputs, ctx.params, rpb_in)
            wrt = [t for t in inputs + [rpb_in] if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, grad_out)) if wrt else iter(())
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs + [rpb_in]]
        return (*result, None)


def na_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NAParams, rpb: Optional[torch.Tensor]
) -> torch.Tensor:
    """The ``"triton"`` backend: 2-D only for now."""
    if len(params.spatial) != 2:
        raise ValueError(f"the triton backend implements na2d only so far, got a {len(params.spatial)}-D call")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {q.device}")
    return _NA2dTriton.apply(q, k, v, rpb, params)
